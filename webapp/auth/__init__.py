"""Demo login/logout with quart-auth, and the page's socket token."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from quart import Blueprint, Quart, Response, current_app, g, jsonify, redirect, request, url_for
from quart.typing import ResponseReturnValue
from quart_auth import AuthUser, QuartAuth, current_user, login_user, logout_user

from ..config import Settings
from ..errors import ApiError
from ..names import is_user_id
from .tokens import TokenSigner

bp = Blueprint("auth", __name__)


def init_app(app: Quart) -> None:
    """Wire quart-auth and the token signer onto the app."""
    settings: Settings = app.config["SETTINGS"]
    app.config.setdefault("QUART_AUTH_COOKIE_SECURE", settings.production)
    app.config.setdefault("QUART_AUTH_DURATION", 7 * 24 * 3600)
    LazyQuartAuth(app)
    app.extensions["tokens"] = TokenSigner(settings.secret_keys)
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.after_request(_set_csrf_cookie)
    app.register_blueprint(bp)


class LazyQuartAuth(QuartAuth):
    """quart-auth that leaves a response alone when nothing this request looked at the user.

    Its after_request otherwise resolves the user from the cookie on every response (REST
    calls included) only to find nothing to write: an unloaded user has made no login,
    logout or renewal, so there is no cookie to set or delete."""

    async def after_request(self, response: Response) -> Response:
        if not hasattr(g, self.attribute_name):
            return response
        return await super().after_request(response)


CSRF_COOKIE = "webapp_csrf"
CSRF_FIELD = "csrf_token"


def csrf_token() -> str:
    """The double-submit token for this browser: its cookie's value, or a new one set with the
    response. A cross-site page can make a browser post our forms, but cannot read the cookie
    (SameSite=Strict: it is not even sent), so it cannot fill the field."""
    token = request.cookies.get(CSRF_COOKIE) or getattr(g, "new_csrf", None)
    if not token:
        token = g.new_csrf = secrets.token_urlsafe(32)
    return token


async def _set_csrf_cookie(response: Response) -> Response:
    new = getattr(g, "new_csrf", None)
    if new:
        response.set_cookie(
            CSRF_COOKIE, new, httponly=True, samesite="Strict", secure=_settings().production, max_age=7 * 24 * 3600
        )
    return response


async def _check_csrf() -> None:
    """A demo form POST must come from our own page: same origin, and the double-submit token."""
    if not _same_origin():
        raise ApiError(403, "forbidden", "cross-origin form post refused")
    form = await request.form
    cookie, field = request.cookies.get(CSRF_COOKIE, ""), str(form.get(CSRF_FIELD, ""))
    if not cookie or not hmac.compare_digest(cookie.encode(), field.encode()):
        raise ApiError(403, "forbidden", "missing or wrong CSRF token: reload the page and try again")


def signer() -> TokenSigner:
    return current_app.extensions["tokens"]  # type: ignore[no-any-return]


def _settings() -> Settings:
    return current_app.config["SETTINGS"]  # type: ignore[no-any-return]


def _same_origin() -> bool:
    """A form POST must come from our own page (login CSRF protection)."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return True  # non-browser clients send neither
    return urlsplit(origin).netloc == request.host


@bp.post("/login")
async def login() -> ResponseReturnValue:
    """Log in to the demo with just a name."""
    if not _settings().demo_login:
        raise ApiError(404, "not_found", "demo login is disabled")
    await _check_csrf()
    form = await request.form
    username = (form.get("username") or "").strip()
    if not is_user_id(username):
        return redirect(url_for("demo.index", error="name: 1-128 of A-Z a-z 0-9 _ . @ -"))
    login_user(AuthUser(username))
    return redirect(url_for("demo.index"))


@bp.post("/logout")
async def logout() -> ResponseReturnValue:
    """End the demo session."""
    await _check_csrf()
    logout_user()
    return redirect(url_for("demo.index"))


@bp.get("/auth/token")
async def token() -> Response:
    """Mint a socket token for the logged-in user."""
    if not await current_user.is_authenticated:
        raise ApiError(401, "unauthorized", "log in first")
    minted = signer().mint(str(current_user.auth_id), _settings().token_ttl)
    response = jsonify({"token": minted.value, "expires_at": minted.expires_at_iso})
    response.headers["Cache-Control"] = "no-store"
    return response

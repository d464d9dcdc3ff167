"""REST hooks: mint socket tokens and broadcast events, behind API keys."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, current_app, jsonify, request

from ..auth import signer
from ..config import Settings
from ..errors import ApiError
from ..names import is_user_id
from ..realtime import realtime
from ..realtime.bus import BusUnavailable
from .schemas import EmitIn, TokenIn

bp = Blueprint("api", __name__, url_prefix="/api")

Model = TypeVar("Model", bound=BaseModel)


def _settings() -> Settings:
    return current_app.config["SETTINGS"]  # type: ignore[no-any-return]


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    """Compare against every key in constant time, so timing tells nothing."""
    matched = False
    candidate = presented.encode()
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


@bp.before_request
async def require_api_key() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    keys = _settings().api_keys
    if scheme.lower() != "bearer" or not presented.strip() or not key_is_valid(presented.strip(), keys):
        raise ApiError(
            401,
            "unauthorized",
            "send a valid API key as 'Authorization: Bearer <key>'"
            if keys
            else "no API keys are configured (set API_KEYS)",
            {"WWW-Authenticate": 'Bearer realm="api"'},
        )


async def body_as(model: type[Model]) -> Model:
    """Parse the JSON body into `model`: 400 when it is not JSON, 422 when fields are wrong."""
    raw = await request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_fields", "body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise ApiError(422, "invalid_fields", problems) from None


@bp.post("/tokens")
async def create_token() -> Response:
    """Mint a socket token for any user (for your own backend to hand out)."""
    body = await body_as(TokenIn)
    settings = _settings()
    ttl = body.ttl or settings.token_ttl
    if ttl > settings.max_token_ttl:
        raise ApiError(422, "invalid_fields", f"ttl: at most {settings.max_token_ttl} seconds")
    minted = signer().mint(body.user_id, ttl)
    response = jsonify({"token": minted.value, "expires_at": minted.expires_at_iso})
    response.status_code = 201
    return response


@bp.post("/emit/all")
async def emit_all() -> Response:
    """Send an event to every open connection on every instance."""
    return await _emit("all", realtime().propagator.emit_to_all)


@bp.post("/emit/authenticated")
async def emit_authenticated() -> Response:
    """Send an event to every connection that has a user."""
    return await _emit("authenticated", realtime().propagator.emit_to_authenticated)


@bp.post("/emit/users/<user_id>")
async def emit_user(user_id: str) -> Response:
    """Send an event to every socket of one user."""
    if not is_user_id(user_id):
        raise ApiError(422, "invalid_fields", "user_id: 1-128 characters of A-Z a-z 0-9 _ . @ -")
    return await _emit("user", functools.partial(realtime().propagator.emit_to_user, user_id))


async def _emit(scope: str, publish: Callable[[str, Any], Awaitable[str]]) -> Response:
    """Validate the body and hand the event to the bus: 202 only once the bus took it."""
    body = await body_as(EmitIn)
    try:
        envelope_id = await publish(body.event, body.data)
    except TypeError as exc:  # orjson refuses what JSON parsing accepted: nesting over 254
        raise ApiError(422, "invalid_fields", f"data: cannot be encoded ({exc})") from None
    except BusUnavailable as exc:
        current_app.logger.warning("emit refused, bus unavailable: %s", exc)
        raise ApiError(
            503, "bus_unavailable", "the event bus did not confirm the event: it was most likely not sent, but may have been (a lost reply)", {"Retry-After": "1"}
        ) from None
    response = jsonify({"accepted": True, "id": envelope_id, "scope": scope})
    response.status_code = 202
    return response

"""Quart + Socket.IO gateways on many instances, joined by Redis."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quart import Quart, Response
from quart.sessions import SessionInterface, SessionMixin
from quart.wrappers import BaseRequestWebsocket
from werkzeug.wrappers.response import Response as WerkzeugResponse

from . import logs
from .config import ConfigError, Settings

__all__ = ["ConfigError", "Settings", "create_app"]

ROOT = Path(__file__).resolve().parent.parent


def create_app(settings: Settings | None = None, config: Mapping[str, Any] | None = None) -> Quart:
    """Build the Quart app and its services; nothing connects until the app starts serving.

    `settings` defaults to the environment (Settings.from_env); `config` overrides Quart config.
    """
    settings = settings or Settings.from_env()
    app = Quart(__name__, static_folder=str(_assets("static")), template_folder=str(_assets("templates")))
    app.config.from_mapping(
        SETTINGS=settings,
        REALTIME_SETTINGS=settings,
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_payload_bytes,
        JSON_SORT_KEYS=False,
    )
    if config:
        app.config.update(config)
    app.session_interface = NoSessions()  # type: ignore[assignment]
    logs.install(settings.instance_id, json_lines=settings.log_format == "json")
    logs.track_requests(app, access=settings.access_log)
    settings.warn_about_defaults()

    from . import api, auth, demo, errors, health
    from .api import docs
    from .realtime import Realtime

    errors.register(app)
    docs.init_app(app)
    auth.init_app(app)
    Realtime(app, join_policy=demo.public_rooms, presence_events=("public:",))
    app.register_blueprint(api.bp)
    app.register_blueprint(demo.bp)
    app.register_blueprint(health.bp)
    return app


def _assets(name: str) -> Path:
    """Where the demo's templates or static files are: inside the package when installed from
    the wheel, at the top of the source tree otherwise (editable installs, a checkout)."""
    packaged = Path(__file__).resolve().parent / name
    return packaged if packaged.is_dir() else ROOT / name


class NoSessions(SessionInterface):
    """Nothing here uses `quart.session` (quart-auth keeps its own cookie), so no request pays
    for opening and saving one: about 2% of a REST call's CPU in the profile."""

    async def open_session(self, app: Quart, request: BaseRequestWebsocket) -> SessionMixin | None:
        return await self.make_null_session(app)

    async def save_session(
        self, app: Quart, session: SessionMixin, response: Response | WerkzeugResponse | None
    ) -> None:
        return None

"""Realtime service: Socket.IO server, socket state, bus and propagator, owned by the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import socketio
from quart import Quart, current_app

from ..auth.tokens import TokenSigner
from ..config import Settings
from . import gateway
from .bus import Bus, MemoryBus, RedisBus
from .propagator import Propagator
from .state import SocketState

EXTENSION = "realtime"


class Realtime:
    """Builds the realtime parts from settings; starts and stops them with the app."""

    def __init__(self, app: Quart | None = None) -> None:
        self.lost_answers = 0
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        settings: Settings = app.config["SETTINGS"]
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            cors_allowed_origins=list(settings.cors_origins) or None,
            max_http_buffer_size=settings.max_payload_bytes,
            logger=False,
            engineio_logger=False,
        )
        self.bus: Bus = (
            RedisBus(settings.redis_url, timeout=settings.redis_timeout)
            if settings.redis_url
            else MemoryBus()
        )
        self.state = SocketState()
        self.propagator = Propagator(
            self.bus, self.state, self.sio, settings.channel_prefix, settings.instance_id
        )
        signer: TokenSigner = app.extensions["tokens"]
        gateway.register(self, signer)
        app.extensions[EXTENSION] = self
        app.while_serving(self._serve)

    async def _serve(self) -> AsyncIterator[None]:
        await self.propagator.start()
        try:
            yield
        finally:
            await self.propagator.close()

    def status(self) -> dict[str, Any]:
        return {
            "bus": self.bus.status(),
            **self.propagator.status(),
            "answers_not_propagated": self.lost_answers,
        }


def realtime() -> Realtime:
    """The current app's Realtime service, or a clear error when it was never set up."""
    try:
        return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError("Realtime is not initialised on this app; use create_app()") from None


def mount(app: Quart) -> socketio.ASGIApp:
    """Serve Socket.IO at /socket.io/ and everything else with Quart.

    No on_startup/on_shutdown here: ASGIApp forwards lifespan to Quart only without them.
    """
    service: Realtime = app.extensions[EXTENSION]
    return socketio.ASGIApp(service.sio, other_asgi_app=app)

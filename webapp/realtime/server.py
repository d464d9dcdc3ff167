"""A Socket.IO server that treats malformed or hostile packets as the client's fault, not a crash."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import socketio
from socketio import packet as sio_packet

from ..names import RESERVED_EVENTS
from .transport import LeanEngine, LeanSocket

_UNUSED_AFTER_HANDSHAKE = (
    "wsgi.input",
    "HTTP_SEC_WEBSOCKET_KEY",
    "HTTP_SEC_WEBSOCKET_EXTENSIONS",
    "HTTP_SEC_WEBSOCKET_VERSION",
)

log = logging.getLogger(__name__)


class MalformedPacket(ValueError):
    """A client sent something no correct Socket.IO client sends."""


class GuardedServer(socketio.AsyncServer):
    """Drops the connection of a client that sends garbage, with one log line instead of a traceback.

    python-socketio would also dispatch an *event* named "connect" or "disconnect" to the
    connection handlers; a client could then detach itself from the socket state while staying
    connected. Those names are refused here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Extra fields of a socket's CONNECT reply (the recovery protocol's `pid`).
        self.connect_reply: Callable[[str], dict[str, Any]] | None = None
        self.malformed_packets = 0
        self._last_warning = 0.0

    def _engineio_server_class(self) -> type[LeanEngine]:
        return LeanEngine

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> None:
        self.eio.watch()  # the sweep that replaces the library's client monitor
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None:
            LeanSocket.adopt(sock)  # before the library schedules its pings and WebSocket loops
        # The environ lives as long as the connection. Its request body wrapper is an instance
        # of a class built per request (about 2.5 KB), and nothing reads it after the handshake.
        for key in _UNUSED_AFTER_HANDSHAKE:
            environ.pop(key, None)
        await super()._handle_eio_connect(eio_sid, environ)

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        if (
            self.connect_reply is not None
            and pkt.packet_type == sio_packet.CONNECT
            and isinstance(pkt.data, dict)
            and isinstance(pkt.data.get("sid"), str)
        ):
            pkt.data = {**pkt.data, **self.connect_reply(pkt.data["sid"])}
        await super()._send_packet(eio_sid, pkt)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            if isinstance(data, str) and data[:1] == "0" and self.manager.sid_from_eio_sid(eio_sid, "/"):
                raise MalformedPacket("a second CONNECT on a connected socket")
            await super()._handle_eio_message(eio_sid, data)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            self._refuse(eio_sid, exc)
            await self.eio.disconnect(eio_sid)

    async def _handle_event(self, eio_sid: str, namespace: str, id: Any, data: Any) -> None:
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            raise MalformedPacket("an event packet without an event name")
        if data[0] in RESERVED_EVENTS:
            raise MalformedPacket(f"the reserved event name {data[0]!r}")
        await super()._handle_event(eio_sid, namespace, id, data)

    def _refuse(self, eio_sid: str, exc: Exception) -> None:
        self.malformed_packets += 1
        now = time.monotonic()
        if now - self._last_warning >= 5.0:  # rate-limited: a hostile client must not flood the log
            self._last_warning = now
            log.warning(
                "malformed packet from %s (%s: %s); disconnecting it (%d so far)",
                eio_sid, type(exc).__name__, exc, self.malformed_packets,
            )


class _OneLine(logging.Filter):
    """Turns a library's logged traceback into one line: hostile input is not our bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def engineio_logger() -> logging.Logger:
    """Engine.IO's logger: warnings and up, and no tracebacks for malformed frames."""
    logger = logging.getLogger("webapp.engineio")
    if not logger.filters:
        logger.addFilter(_OneLine())
        logger.setLevel(logging.WARNING)
    return logger

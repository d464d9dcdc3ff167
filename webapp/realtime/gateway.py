"""Socket.IO handlers: the token check on connect, and gateways whose answers propagate."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import socketio

from ..auth.tokens import InvalidToken, TokenSigner
from .bus import BusUnavailable

if TYPE_CHECKING:
    from . import Realtime

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Any]
Gateway = Callable[[str, Any], Awaitable[Any]]


def token_from(environ: dict[str, Any], auth: Any) -> str | None:
    """The handshake token: `auth.token`, else query `token`, else a Bearer header."""
    if isinstance(auth, dict) and auth.get("token"):
        return str(auth["token"])
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if query.get("token"):
        return query["token"][0]
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def propagate(realtime: Realtime, event: str) -> Callable[[Handler], Gateway]:
    """Send each answer of a handler to the asking socket and to its user's other sockets.

    A handler returns None (no answer), a list (one answer per item), an async generator
    (one answer per item) or any other value (one answer). Answers go out in order; the
    asking socket gets each directly and never again through the bus.
    """

    def decorate(handler: Handler) -> Gateway:
        @functools.wraps(handler)
        async def gateway(sid: str, data: Any) -> Any:
            result = handler(sid, data)
            if inspect.isawaitable(result):
                result = await result
            count = 0
            if inspect.isasyncgen(result):
                async for answer in result:
                    await _answer(realtime, sid, event, answer)
                    count += 1
            elif isinstance(result, list):
                for answer in result:
                    await _answer(realtime, sid, event, answer)
                    count += 1
            elif result is not None:
                await _answer(realtime, sid, event, result)
                count = 1
            return {"ok": True, "answers": count}

        return gateway

    return decorate


async def _answer(realtime: Realtime, sid: str, event: str, data: Any) -> None:
    propagator = realtime.propagator
    await propagator.send([sid], event, data)
    user_id = propagator.state.user_of(sid)
    if user_id is None:
        return  # anonymous sockets have no other sockets to reach
    try:
        await propagator.emit_to_user(user_id, event, data, origin_sid=sid)
    except BusUnavailable as exc:
        realtime.lost_answers += 1
        log.warning("answer to %s not propagated to %s's other sockets: %s", sid, user_id, exc)


class GatewayError(ValueError):
    """A gateway refuses a payload; the asking socket gets an `error` event."""


def register(realtime: Realtime, signer: TokenSigner) -> None:
    """Attach the connect/disconnect handlers and the gateways to the server."""
    sio: socketio.AsyncServer = realtime.sio

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = token_from(environ, auth)
        user_id = None
        if token is not None:
            try:
                user_id = signer.verify(token)
            except InvalidToken as exc:
                raise socketio.exceptions.ConnectionRefusedError(
                    "invalid token", {"code": "invalid_token", "message": str(exc)}
                ) from None
        await realtime.propagator.attach(sid, user_id)

    @sio.event
    async def disconnect(sid: str, reason: Any = None) -> None:
        await realtime.propagator.detach(sid)

    @sio.event
    async def whoami(sid: str, data: Any = None) -> dict[str, Any]:
        """Tell a socket who it is and which instance holds it (as an ack)."""
        return {
            "sid": sid,
            "user_id": realtime.propagator.state.user_of(sid),
            "instance": realtime.propagator.instance_id,
        }

    @sio.on("events")
    @propagate(realtime, "events")
    async def events(sid: str, data: Any) -> list[Any]:
        """Echo the payload back: one answer, seen by all of the user's sockets."""
        return [data]

    @sio.on("stream")
    async def stream_gateway(sid: str, data: Any) -> Any:
        try:
            count = _stream_count(data)
        except GatewayError as exc:
            await realtime.propagator.send([sid], "error", {"code": "bad_payload", "message": str(exc)})
            return {"ok": False, "error": str(exc)}
        return await _stream(sid, count)

    @propagate(realtime, "stream")
    async def _stream(sid: str, count: int) -> Any:
        """Answer 1..count as separate answers, like the original's stream of 1, 2, 3."""
        for n in range(1, count + 1):
            yield {"n": n, "of": count}


def _stream_count(data: Any) -> int:
    count = data.get("count", 3) if isinstance(data, dict) else data if data is not None else 3
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 100:
        raise GatewayError("stream expects {\"count\": 1..100}")
    return count

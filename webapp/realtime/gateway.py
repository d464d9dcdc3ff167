"""Socket.IO handlers: the token check on connect, and gateways whose answers propagate."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import socketio

from ..auth.tokens import Claims, InvalidToken, TokenSigner
from ..names import is_room_name, looks_like_sid
from . import recovery, scopes
from .bus import BusUnavailable
from .directory import UserRecord
from .propagator import SubscriptionFailed

if TYPE_CHECKING:
    from . import Realtime

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Any]
Gateway = Callable[[str, Any], Awaitable[Any]]


def token_from(environ: dict[str, Any], auth: Any, *, allow_query: bool = True) -> str | None:
    """The handshake token: `auth.token`, else query `token` (unless ALLOW_QUERY_TOKEN is off:
    URLs end up in proxy logs), else a Bearer header."""
    if isinstance(auth, dict) and auth.get("token"):
        return str(auth["token"])
    query = parse_qs(str(environ.get("QUERY_STRING", ""))) if allow_query else {}
    if query.get("token"):
        return query["token"][0]
    header = str(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(
    signer: TokenSigner, environ: dict[str, Any], auth: Any, *, allow_query: bool = True
) -> Claims | None:
    """What a handshake's token proves, None for an anonymous one; a bad token refuses the connection."""
    token = token_from(environ, auth, allow_query=allow_query)
    if token is None:
        return None
    try:
        return signer.claims(token)
    except InvalidToken as exc:
        raise _invalid_token(str(exc)) from None


def _invalid_token(message: str) -> socketio.exceptions.ConnectionRefusedError:
    return socketio.exceptions.ConnectionRefusedError("invalid token", {"code": "invalid_token", "message": message})


class GatewayError(ValueError):
    """A gateway refuses a payload; the asking socket gets an `error` event."""


def propagate(realtime: Realtime, event: str) -> Callable[[Handler], Gateway]:
    """Send each answer of a handler to the asking socket and to its user's other sockets.

    A handler returns None (no answer), a list, a generator or an async generator (one answer
    per item), or any other value (one answer); it raises GatewayError to refuse a payload.
    Answers go out in order; the asking socket gets each directly and never again through the
    bus. Before the handler runs, the socket's rate and the payload's size and JSON-ness are
    checked.
    """

    def decorate(handler: Handler) -> Gateway:
        @functools.wraps(handler)
        async def gateway(sid: str, data: Any = None) -> Any:
            problem = realtime.refuse_input(sid, data)
            if problem is not None:
                await _error(realtime, sid, event, *problem)
                return {"ok": False, "error": problem[0]}
            try:
                result = handler(sid, data)
                if inspect.isawaitable(result):
                    result = await result
            except GatewayError as exc:
                await _error(realtime, sid, event, "bad_payload", str(exc))
                return {"ok": False, "error": "bad_payload", "message": str(exc)}
            count = 0
            if inspect.isasyncgen(result):
                async for answer in result:
                    count += await _answer(realtime, sid, event, answer)
            elif isinstance(result, (list, types.GeneratorType)):
                for answer in result:
                    count += await _answer(realtime, sid, event, answer)
            elif result is not None:
                count += await _answer(realtime, sid, event, result)
            return {"ok": True, "answers": count}

        return gateway

    return decorate


async def _answer(realtime: Realtime, sid: str, event: str, data: Any) -> int:
    """Answer the asking socket, then its user's other sockets; 1 when answered."""
    propagator = realtime.propagator
    user_id = propagator.state.user_of(sid)
    raw = None
    if user_id is not None:
        try:
            raw = propagator.publisher.answer_envelope(user_id, event, data, propagator.origin_of(sid))
        except (TypeError, orjson.JSONEncodeError) as exc:
            log.error("gateway %s gave an answer that is not JSON: %s", event, exc)
            await _error(realtime, sid, event, "bad_answer", "the gateway's answer could not be encoded")
            return 0
    propagator.send([sid], event, data)
    if raw is not None and not await propagator.publisher.propagate_answer(user_id or "", raw):
        log.warning("answer to %s not propagated to %s's other sockets: outbox full", sid, user_id)
    return 1


async def _error(realtime: Realtime, sid: str, event: str, code: str, message: str) -> None:
    realtime.propagator.send([sid], "error", {"code": code, "message": message, "event": event})


def register(realtime: Realtime, signer: TokenSigner) -> None:
    """Attach the connect/disconnect handlers and the gateways to the server."""
    sio: socketio.AsyncServer = realtime.sio

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        try:
            await accept(sid, environ, auth)
        except socketio.exceptions.ConnectionRefusedError as exc:
            data = exc.error_args.get("data") if isinstance(exc.error_args, dict) else None
            realtime.connects[data.get("code", "refused") if isinstance(data, dict) else "refused"] += 1
            raise
        realtime.connects["accepted"] += 1

    async def accept(sid: str, environ: dict[str, Any], auth: Any) -> None:
        if realtime.draining:
            raise socketio.exceptions.ConnectionRefusedError(
                "shutting down", {"code": "shutting_down", "message": "this instance is shutting down"}
            )
        claims = authenticate(signer, environ, auth, allow_query=realtime.settings.allow_query_token)
        # The user's record (backend rooms, revocation) is read while the user's channel is
        # subscribed: one round trip overlaps the other. A revoked token, rare, is detached again.
        record = asyncio.ensure_future(realtime.users.record_or_empty(claims.user_id)) if claims else None

        async def rooms(record: asyncio.Future[UserRecord]) -> set[str]:
            return (await record).rooms

        # A task, not a coroutine: fine to leave unawaited if attach fails before it needs it.
        given = asyncio.ensure_future(rooms(record)) if record is not None else None
        try:
            await realtime.propagator.attach(sid, claims.user_id if claims else None, recovery.requested(auth), given)
        except SubscriptionFailed as exc:
            raise socketio.exceptions.ConnectionRefusedError(
                "bus unavailable",
                {"code": "bus_unavailable", "message": "the event bus did not confirm this socket's channel; retry"},
            ) from exc
        finally:
            if record is not None and not record.done():
                await asyncio.wait([record])
        if claims is not None and record is not None and not record.result().allows(claims):
            await realtime.propagator.detach(sid)
            raise _invalid_token("token was revoked; ask for a new one")
        if claims is not None and realtime.expiry is not None:
            realtime.expiry.watch(sid, claims.expires_at)

    @sio.event
    async def disconnect(sid: str, reason: Any = None) -> None:
        realtime.disconnects[reason if isinstance(reason, str) and len(reason) < 40 else "other"] += 1
        realtime.limiter.forget(sid)
        if realtime.expiry is not None:
            realtime.expiry.forget(sid)
        await realtime.propagator.detach(sid)

    @sio.event
    async def whoami(sid: str, data: Any = None) -> dict[str, Any]:
        """Tell a socket who it is and which instance holds it (as an ack)."""
        if not realtime.limiter.allow(sid):
            return {"ok": False, "error": "rate_limited"}
        return {
            "sid": sid,
            "user_id": realtime.propagator.state.user_of(sid),
            "instance": realtime.propagator.instance_id,
        }

    @sio.event
    async def join(sid: str, data: Any = None) -> dict[str, Any]:
        """Join a room, if the join policy allows it: `{"room": "..."}`."""
        room, refused = await _room_asked(realtime, sid, "join", data)
        if room is None:
            return {"ok": False, "error": refused}
        user_id = realtime.propagator.state.user_of(sid)
        if not await realtime.may_join(user_id, room):
            await _error(realtime, sid, "join", "forbidden", f"you may not join {room!r}")
            return {"ok": False, "error": "forbidden"}
        try:
            await sio.enter_room(sid, room)
        except SubscriptionFailed:
            await _error(realtime, sid, "join", "bus_unavailable", "the event bus did not confirm the room; retry")
            return {"ok": False, "error": "bus_unavailable"}
        return {"ok": True, "room": room}

    @sio.event
    async def leave(sid: str, data: Any = None) -> dict[str, Any]:
        """Leave a room the socket is in: `{"room": "..."}`."""
        room, refused = await _room_asked(realtime, sid, "leave", data)
        if room is None:
            return {"ok": False, "error": refused}
        await sio.leave_room(sid, room)
        return {"ok": True, "room": room}

    @sio.event
    async def room_send(sid: str, data: Any = None) -> dict[str, Any]:
        """Send `{"room", "text"}` to everyone in a room the socket is in, on every instance."""
        room, refused = await _member_room(realtime, sid, "room_send", data)
        if room is None:
            return {"ok": False, "error": refused}
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str) or not 0 < len(text) <= 2000:
            await _error(realtime, sid, "room_send", "bad_payload", 'room_send expects {"room", "text": 1-2000 characters}')
            return {"ok": False, "error": "bad_payload"}
        message = {"room": room, "from": realtime.propagator.state.user_of(sid), "text": text}
        try:
            await realtime.publisher.emit_to_room(room, "room_message", message)
        except BusUnavailable:
            await _error(realtime, sid, "room_send", "bus_unavailable", "the event bus did not take the message; retry")
            return {"ok": False, "error": "bus_unavailable"}
        return {"ok": True}

    @sio.event
    async def who(sid: str, data: Any = None) -> dict[str, Any]:
        """Who is in a room the socket is in: `{"room"}` -> `{"room", "members": [{"user_id", "sockets"}]}`."""
        room, refused = await _member_room(realtime, sid, "who", data)
        if room is None:
            return {"ok": False, "error": refused}
        try:
            members, _ = await realtime.presence.room(room)
        except BusUnavailable:
            return {"ok": False, "error": "bus_unavailable"}
        return {"ok": True, "room": room, "members": members}


async def _room_asked(realtime: Realtime, sid: str, event: str, data: Any) -> tuple[str | None, str]:
    """The room a join, leave, room_send or who names, or None and the error code the socket
    was told. The scopes' own rooms are refused before any join policy is asked: no policy
    can hand out `authenticated`, `user:*` or a sid's or node's name."""
    problem = realtime.refuse_input(sid, data)
    if problem is not None:
        await _error(realtime, sid, event, *problem)
        return None, problem[0]
    room = data.get("room") if isinstance(data, dict) else None
    if not (is_room_name(room) or (isinstance(room, str) and looks_like_sid(room))):
        await _error(
            realtime, sid, event, "bad_payload",
            f'{event} expects {{"room": "<1-128 characters of A-Z a-z 0-9 _ . @ - :>"}}',
        )
        return None, "bad_payload"
    if scopes.reserved(str(room)) or not scopes.member_may_publish("room"):
        await _error(realtime, sid, event, "forbidden", f"{room!r} belongs to a delivery scope, not to sockets")
        return None, "forbidden"
    return str(room), ""


async def _member_room(realtime: Realtime, sid: str, event: str, data: Any) -> tuple[str | None, str]:
    """The room an event names if the socket is in it, else None and the error code it was told."""
    room, refused = await _room_asked(realtime, sid, event, data)
    if room is None:
        return None, refused
    if room not in realtime.sio.rooms(sid):
        await _error(realtime, sid, event, "forbidden", f"join {room!r} first")
        return None, "forbidden"
    return room, ""

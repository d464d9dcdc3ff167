"""REST hooks: mint socket tokens and broadcast events, behind API keys."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, current_app, jsonify, request
from quart_schema import security_scheme_blueprint

from ..auth import signer
from ..config import Settings
from ..errors import ApiError
from ..names import is_room_name, is_user_id
from ..realtime import BusUnavailable, Outgoing, Scope, realtime, scopes
from ..realtime.control import iso
from ..realtime.presence import PAGE_MAX
from .docs import (
    AUTH,
    BODY,
    BUS,
    PATH,
    AcceptedOut,
    ManyAcceptedOut,
    MembershipOut,
    PresenceOut,
    PresencesOut,
    RevokedOut,
    RoomPresenceOut,
    RoomPresenceQuery,
    StatusOut,
    TokenOut,
    UserOpOut,
    UserRoomsOut,
    documented,
)
from .schemas import BatchIn, DisconnectIn, EmitIn, PresenceIn, TokenIn, UsersEmitIn

bp = Blueprint("api", __name__, url_prefix="/api")
security_scheme_blueprint(bp, [{"apiKey": []}])

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


@bp.get("/status")
@documented((200, StatusOut), errors=AUTH)
async def status() -> Response:
    """This instance's details: readiness, the bus (errors included), sockets, counters."""
    service = realtime()
    return jsonify({"ready": service.ready, "instance": _settings().instance_id, **service.status()})


@bp.post("/tokens")
@documented((201, TokenOut), body=TokenIn, errors=AUTH + BODY)
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
@documented((202, AcceptedOut), body=EmitIn, errors=AUTH + BODY + BUS)
async def emit_all() -> Response:
    """Send an event to every open connection on every instance."""
    return await _emit("all")


@bp.post("/emit/authenticated")
@documented((202, AcceptedOut), body=EmitIn, errors=AUTH + BODY + BUS)
async def emit_authenticated() -> Response:
    """Send an event to every connection that has a user."""
    return await _emit("authenticated")


@bp.post("/emit/users/<user_id>")
@documented((202, AcceptedOut), body=EmitIn, errors=AUTH + BODY + PATH + BUS)
async def emit_user(user_id: str) -> Response:
    """Send an event to every socket of one user."""
    _check_user_id(user_id)
    return await _emit("user", user_id=user_id)


@bp.post("/emit/rooms/<room>")
@documented((202, AcceptedOut), body=EmitIn, errors=AUTH + BODY + PATH + BUS)
async def emit_room(room: str) -> Response:
    """Send an event to every socket in a room, on every instance."""
    _check_room(room)
    return await _emit("room", room=room)


@bp.get("/users/<user_id>/rooms")
@documented((200, UserRoomsOut), errors=AUTH + PATH + BUS)
async def user_rooms(user_id: str) -> Response:
    """The rooms the backend put a user in."""
    _check_user_id(user_id)
    async with _bus_call(_NO_ANSWER + "the rooms could not be read"):
        rooms = await realtime().user_rooms(user_id)
    return jsonify({"user_id": user_id, "rooms": sorted(rooms)})


@bp.put("/users/<user_id>/rooms/<room>")
@documented((200, MembershipOut), errors=AUTH + PATH + BUS)
async def join_room(user_id: str, room: str) -> Response:
    """Put every socket of a user in a room, on every instance, and the sockets it opens later."""
    return await _membership(user_id, room, member=True)


@bp.delete("/users/<user_id>/rooms/<room>")
@documented((200, MembershipOut), errors=AUTH + PATH + BUS)
async def leave_room(user_id: str, room: str) -> Response:
    """Take every socket of a user out of a room, now and for the sockets it opens later."""
    return await _membership(user_id, room, member=False)


async def _membership(user_id: str, room: str, *, member: bool) -> Response:
    """Store the membership, then have every instance apply it to the user's live sockets.
    Both steps are idempotent, so a 503 is answered by retrying."""
    _check_user_id(user_id)
    _check_room(room)
    async with _bus_call(_NO_ANSWER + "the membership may not be stored or applied; retry (it is idempotent)"):
        changed = await realtime().put_in_room(user_id, room, member=member)
    return jsonify({"user_id": user_id, "room": room, "member": member, "changed": changed})


@bp.post("/users/<user_id>/disconnect")
@documented((202, UserOpOut), body=DisconnectIn, errors=AUTH + BODY + PATH + BUS)
async def disconnect_user(user_id: str) -> Response:
    """Disconnect every socket of a user on every instance.

    Each socket is told why first (`disconnect_reason`), and the official clients do not
    reconnect by themselves after it."""
    _check_user_id(user_id)
    body = await body_as(DisconnectIn)
    async with _bus_call(_NO_ANSWER + "the disconnect was most likely not sent, but may have been"):
        envelope_id = await realtime().disconnect_user(user_id, body.reason)
    return _accepted({"id": envelope_id, "user_id": user_id})


@bp.get("/users/<user_id>/presence")
@documented((200, PresenceOut), errors=AUTH + PATH + BUS)
async def user_presence(user_id: str) -> Response:
    """Whether a user is online anywhere: `{online, sockets, instances, since}`."""
    _check_user_id(user_id)
    async with _bus_call(_NO_ANSWER + "presence could not be read"):
        (found,) = await realtime().presence.users([user_id])
    return jsonify(found.as_json())


@bp.post("/presence")
@documented((200, PresencesOut), body=PresenceIn, errors=AUTH + BODY + BUS)
async def many_presences() -> Response:
    """The presence of up to 1,000 users in one call, in the order asked."""
    body = await body_as(PresenceIn)
    async with _bus_call(_NO_ANSWER + "presence could not be read"):
        found = await realtime().presence.users(body.user_ids)
    return jsonify({"users": [entry.as_json() for entry in found]})


@bp.get("/rooms/<room>/presence")
@documented((200, RoomPresenceOut), query=RoomPresenceQuery, errors=AUTH + PATH + BUS)
async def room_presence(room: str) -> Response:
    """The users in a room with their socket counts, a page at a time.

    In user id order: `?limit=` (at most 1,000) and `?after=<next>` from the previous page."""
    _check_room(room)
    after = request.args.get("after") or None
    if after is not None and not is_user_id(after):
        raise ApiError(422, "invalid_fields", "after: the `next` of the previous page")
    try:
        limit = int(request.args.get("limit", PAGE_MAX))
    except ValueError:
        raise ApiError(422, "invalid_fields", f"limit: an integer from 1 to {PAGE_MAX}") from None
    if not 1 <= limit <= PAGE_MAX:
        raise ApiError(422, "invalid_fields", f"limit: an integer from 1 to {PAGE_MAX}")
    async with _bus_call(_NO_ANSWER + "presence could not be read"):
        members, cursor = await realtime().presence.room(room, after, limit)
    return jsonify({"room": room, "members": members, "next": cursor})


@bp.post("/users/<user_id>/revoke")
@documented((202, RevokedOut), errors=AUTH + PATH + BUS)
async def revoke_user(user_id: str) -> Response:
    """Refuse the user's tokens minted before now, and disconnect the user's live sockets.

    In force on every instance; tokens minted afterwards work."""
    _check_user_id(user_id)
    async with _bus_call(_NO_ANSWER + "the revocation may not be in force; retry (it is idempotent)"):
        envelope_id, not_before = await realtime().revoke(user_id)
    return _accepted({"id": envelope_id, "user_id": user_id, "not_before": iso(not_before)})


def _check_user_id(user_id: str) -> None:
    if not is_user_id(user_id):
        raise ApiError(422, "invalid_fields", "user_id: 1-128 characters of A-Z a-z 0-9 _ . @ -")


def _check_room(room: str) -> None:
    if not is_room_name(room):
        raise ApiError(422, "invalid_fields", "room: 1-128 characters of A-Z a-z 0-9 _ . @ - : (not shaped like a sid)")
    if scopes.reserved(room):
        raise ApiError(422, "invalid_fields", f"room: {room!r} belongs to a delivery scope; use its emit hook")


_NO_ANSWER = "the event bus did not answer: "


@asynccontextmanager
async def _bus_call(message: str) -> AsyncIterator[None]:
    """The one way the REST hooks answer a bus that did not confirm: 503, Retry-After, `message`."""
    try:
        yield
    except BusUnavailable as exc:
        current_app.logger.warning("bus unavailable: %s", exc)
        raise ApiError(503, "bus_unavailable", message, {"Retry-After": "1"}) from None


def _accepted(body: dict[str, Any]) -> Response:
    # orjson straight into the Response: jsonify's JSON (less its final newline) in 3.6 µs, not 10
    return Response(orjson.dumps({"accepted": True, **body}), status=202, content_type="application/json")


@bp.post("/emit/batch")
@documented((202, ManyAcceptedOut), body=BatchIn, errors=AUTH + BODY + BUS)
async def emit_batch() -> Response:
    """Up to MAX_BATCH events of any scopes in one call, all or nothing.

    All are validated first (a 422 names the bad indexes), then published together: 202 with
    one id per event, in order."""
    body = await body_as(BatchIn)
    _check_batch_size("events", len(body.events))
    service = realtime()
    outgoing = []
    for index, item in enumerate(body.events):
        try:
            target = {"user_id": getattr(item, "user_id", None), "room": getattr(item, "room", None)}
            outgoing.append(service.addressed(item.scope, item.event, item.data, **target))
        except TypeError as exc:
            raise ApiError(422, "invalid_fields", f"events.{index}.data: cannot be encoded ({exc})") from None
    return await _publish_many(outgoing, "batch")


@bp.post("/emit/users")
@documented((202, ManyAcceptedOut), body=UsersEmitIn, errors=AUTH + BODY + BUS)
async def emit_users() -> Response:
    """One event to every socket of each of many users (up to MAX_BATCH), in one call."""
    body = await body_as(UsersEmitIn)
    _check_batch_size("user_ids", len(body.user_ids))
    service = realtime()
    try:
        outgoing = [service.addressed("user", body.event, body.data, user_id=u) for u in dict.fromkeys(body.user_ids)]
    except TypeError as exc:
        raise ApiError(422, "invalid_fields", f"data: cannot be encoded ({exc})") from None
    return await _publish_many(outgoing, "user")


def _check_batch_size(field: str, size: int) -> None:
    limit = _settings().max_batch
    if size > limit:
        raise ApiError(422, "invalid_fields", f"{field}: at most {limit} (MAX_BATCH) per call, got {size}")


async def _publish_many(outgoing: list[Outgoing], scope: str) -> Response:
    async with _bus_call("the event bus did not confirm every event: some may have been sent; a retry may duplicate those"):
        await realtime().emit_many(outgoing)
    return _accepted({"ids": [item.envelope_id for item in outgoing], "scope": scope})


async def _emit(scope: Scope, *, user_id: str | None = None, room: str | None = None) -> Response:
    """Validate the body and hand the event to the bus: 202 only once the bus took it."""
    body = await body_as(EmitIn)
    try:
        async with _bus_call(
            "the event bus did not confirm the event: it was most likely not sent, but may have been (a lost reply)"
        ):
            envelope_id = await realtime().emit(scope, body.event, body.data, user_id=user_id, room=room)
    except TypeError as exc:  # orjson refuses what JSON parsing accepted: nesting over 254
        raise ApiError(422, "invalid_fields", f"data: cannot be encoded ({exc})") from None
    return _accepted({"id": envelope_id, "scope": scope})

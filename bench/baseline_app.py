"""The baseline: the smallest correct app with our interface, on python-socketio's AsyncRedisManager.

Same environment, tokens, REST hooks, body validation and `events` gateway as webapp; only the
propagation differs. Users are rooms (`user:<id>`, `authenticated`); every emit is published on
one Redis channel that every instance reads, and each instance filters by room locally.

Serve it with `hypercorn bench.baseline_app:app`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from quart import Quart, Response, jsonify, request

from webapp import errors
from webapp.api import body_as, require_api_key
from webapp.api.schemas import EmitIn, TokenIn
from webapp.auth.tokens import TokenSigner
from webapp.config import Settings
from webapp.errors import ApiError
from webapp.names import is_user_id
from webapp.realtime.gateway import authenticate

# The harness waits for this channel's subscribers (bench/cluster.py builds the same name).
CHANNEL_SUFFIX = ":socketio"
# Far above any concurrency the bench reaches, so a publish never fails for want of a connection:
# AsyncRedisManager logs and swallows a failed publish, which would turn into a silent loss.
REDIS_POOL_SIZE = 1000


def create_baseline(settings: Settings) -> socketio.ASGIApp:
    """Build the baseline Quart + Socket.IO app from settings."""
    if settings.redis_url is None:
        raise SystemExit("baseline: REDIS_URL is required")
    manager = socketio.AsyncRedisManager(
        settings.redis_url,
        channel=settings.channel_prefix + CHANNEL_SUFFIX,
        redis_options={"max_connections": REDIS_POOL_SIZE},
    )
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        cors_allowed_origins=list(settings.cors_origins) or None,
        max_http_buffer_size=settings.max_payload_bytes,
    )
    signer = TokenSigner(settings.secret_key)
    users: dict[str, str] = {}  # sid -> user id, for the gateway's propagation

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        claims = authenticate(signer, environ, auth)
        if claims is None:
            return
        user_id = claims.user_id
        users[sid] = user_id
        await sio.enter_room(sid, "authenticated")
        await sio.enter_room(sid, f"user:{user_id}")

    @sio.event  # type: ignore[untyped-decorator]
    async def disconnect(sid: str, reason: Any = None) -> None:
        users.pop(sid, None)

    @sio.event  # type: ignore[untyped-decorator]
    async def join(sid: str, data: Any = None) -> dict[str, Any]:
        # Stock rooms: local membership; every emit still reaches every instance through Redis.
        if sid not in users or not isinstance(data, dict) or not isinstance(data.get("room"), str):
            return {"ok": False, "error": "forbidden"}
        await sio.enter_room(sid, data["room"])
        return {"ok": True, "room": data["room"]}

    @sio.on("events")  # type: ignore[untyped-decorator]
    async def events(sid: str, data: Any = None) -> dict[str, Any]:
        # The asker is local by definition: no need to go through Redis for it.
        await sio.emit("events", data, to=sid, ignore_queue=True)
        user_id = users.get(sid)
        if user_id is not None:
            await sio.emit("events", data, room=f"user:{user_id}", skip_sid=sid)
        return {"ok": True, "answers": 1}

    quart = Quart(__name__)
    quart.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=settings.max_payload_bytes)
    errors.register(quart)
    quart.before_request(_only_api(require_api_key))

    @quart.before_serving
    async def subscribe_now() -> None:
        # python-socketio subscribes on the first connection; an instance must hear emits earlier.
        sio.manager_initialized = True
        manager.initialize()

    @quart.get("/healthz")
    async def healthz() -> Response:
        return jsonify({"status": "ok", "instance": settings.instance_id})

    @quart.get("/readyz")
    async def readyz() -> Response:
        ready = manager.pubsub is not None and manager.pubsub.subscribed
        response = jsonify({"ready": ready, "instance": settings.instance_id, "sockets": len(users)})
        response.status_code = 200 if ready else 503
        return response

    @quart.post("/api/tokens")
    async def create_token() -> Response:
        body = await body_as(TokenIn)
        minted = signer.mint(body.user_id, body.ttl or settings.token_ttl)
        response = jsonify({"token": minted.value, "expires_at": minted.expires_at_iso})
        response.status_code = 201
        return response

    @quart.post("/api/emit/all")
    async def emit_all() -> Response:
        body = await body_as(EmitIn)
        await sio.emit(body.event, body.data)
        return _accepted("all")

    @quart.post("/api/emit/authenticated")
    async def emit_authenticated() -> Response:
        body = await body_as(EmitIn)
        await sio.emit(body.event, body.data, room="authenticated")
        return _accepted("authenticated")

    @quart.post("/api/emit/rooms/<room>")
    async def emit_room(room: str) -> Response:
        body = await body_as(EmitIn)
        await sio.emit(body.event, body.data, room=room)
        return _accepted("room")

    @quart.post("/api/emit/users")
    async def emit_users() -> Response:
        # The stock way to reach many users: one emit per user's room.
        body = await request.get_json()
        for user_id in dict.fromkeys(body["user_ids"]):
            await sio.emit(body["event"], body.get("data"), room=f"user:{user_id}")
        return _accepted("user")

    @quart.post("/api/emit/users/<user_id>")
    async def emit_user(user_id: str) -> Response:
        if not is_user_id(user_id):
            raise ApiError(422, "invalid_fields", "user_id: 1-128 characters of A-Z a-z 0-9 _ . @ -")
        body = await body_as(EmitIn)
        await sio.emit(body.event, body.data, room=f"user:{user_id}")
        return _accepted("user")

    return socketio.ASGIApp(sio, other_asgi_app=quart)


def _only_api(check: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Run webapp's API-key check on /api/* only, as its blueprint hook does."""

    async def hook() -> None:
        if request.path.startswith("/api/"):
            await check()

    return hook


def _accepted(scope: str) -> Response:
    response = jsonify({"accepted": True, "id": uuid.uuid4().hex, "scope": scope})
    response.status_code = 202
    return response


app = create_baseline(Settings.from_env())

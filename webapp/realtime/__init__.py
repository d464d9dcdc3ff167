"""Realtime service: Socket.IO server, socket state, bus and propagator, owned by the app."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import signal
import threading
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
import socketio
from quart import Quart, current_app

from .. import serving
from ..auth.tokens import TokenSigner
from ..config import Settings, hypercorn_worker
from ..metrics import Metrics
from ..names import event_name_problem
from . import frames, gateway, jsoncodec
from .bus import Bus, BusUnavailable, MemoryBus, RedisBus
from .bus.base import cancel
from .bus.cluster import Topology
from .bus.tls import tls_options
from .control import ExpiryWatch, iso
from .directory import UserDirectory
from .limits import RateLimiter
from .manager import FleetManager
from .outbox import Outbox
from .presence import Presence
from .propagator import Propagator
from .publisher import Outgoing, Publisher
from .recovery import Recovery
from .rooms import JoinPolicy, allowed, nobody
from .scopes import Scope
from .server import GuardedServer, engineio_logger
from .state import SocketState

__all__ = ["BusUnavailable", "Outgoing", "Realtime", "Scope", "mount", "realtime"]

EXTENSION = "realtime"
# Events the server handles itself (gateway.register): a gateway must not replace them.
BUILT_IN_EVENTS = frozenset({"connect", "disconnect", "whoami", "join", "leave", "room_send", "who"})
log = logging.getLogger(__name__)


class Realtime:
    """Builds the realtime parts from settings; starts and stops them with the app."""

    def __init__(
        self,
        app: Quart | None = None,
        *,
        join_policy: JoinPolicy = nobody,
        presence_events: tuple[str, ...] = (),
    ) -> None:
        """`join_policy(user_id, room)` decides which rooms a socket may join with the `join`
        event; the default lets sockets join nothing by themselves. Rooms whose names start
        with one of `presence_events` tell their members who joins and leaves (`presence`)."""
        self.draining = False  # refusing new sockets and closing the held ones
        self.unready = False  # /readyz answers 503 (from SIGTERM on, DRAIN_DELAY before the drain)
        self.connects: Counter[str] = Counter()  # handshakes by outcome: accepted, or why refused
        self.disconnects: Counter[str] = Counter()  # by python-socketio's reason
        self.join_policy = join_policy
        self.presence_events = presence_events
        self._drain_task: asyncio.Task[None] | None = None
        self._gateways: dict[str, gateway.Handler] = {}  # registered on the server by init_app
        self._initialised = False
        if app is not None:
            self.init_app(app)

    def gateway(self, event: str) -> Callable[[gateway.Handler], gateway.Handler]:
        """Register `handler(sid, data)` as the gateway for `event`: each answer it gives (a
        value, or one per item of a list or a generator, sync or async) goes to the asking
        socket and, through the bus, to its user's other sockets on every instance; raising
        GatewayError refuses the payload. Usable before or after init_app.

            @realtime.gateway("chat")
            async def chat(sid, data):
                return {"text": data["text"]}
        """
        problem = event_name_problem(event)
        if problem is not None or event in BUILT_IN_EVENTS:
            raise ValueError(problem or f"{event!r} is one of the server's own events")

        def register(handler: gateway.Handler) -> gateway.Handler:
            if event in self._gateways:
                raise ValueError(f"a gateway for {event!r} is registered already")
            self._gateways[event] = handler
            if self._initialised:
                self.sio.on(event, gateway.propagate(self, event)(handler))
            return handler

        return register

    def init_app(self, app: Quart) -> None:
        """Build the services for `app` from `REALTIME_SETTINGS` (a Settings, as create_app
        passes) or else from its `REALTIME_*` config keys; they start and stop with the app."""
        settings: Settings | None = app.config.get("REALTIME_SETTINGS")
        if settings is None:
            settings = Settings.from_config(app.config)
            settings.warn_about_defaults()  # create_app warns for its own; an extension says it too
        self.settings = settings
        manager = FleetManager()
        self.sio = GuardedServer(
            async_mode="asgi",
            client_manager=manager,
            cors_allowed_origins=list(settings.cors_origins) or None,
            # The hard cap per frame; gateways refuse smaller oversized payloads politely.
            max_http_buffer_size=settings.frame_cap,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            logger=False,
            engineio_logger=engineio_logger(),
            json=jsoncodec,
        )
        self.bus: Bus = MemoryBus(settings.replay_max_len, settings.replay_max_age)
        # Every Redis client built from the URL takes these: one TLS policy for all of them.
        tls = tls_options(settings.redis_url, settings.redis_tls_verify, settings.redis_tls_ca)
        topology: Topology | None = None
        if settings.redis_url:
            # One node or a cluster, decided once for every Redis client of the instance.
            topology = Topology(
                settings.redis_url, forced=settings.redis_cluster, timeout=settings.redis_timeout, tls=tls
            )
            self.bus = RedisBus(
                settings.redis_url,
                timeout=settings.redis_timeout,
                backoff_max=settings.redis_backoff_max,
                # One hash tag: on a cluster the history and its epoch live (and fail over) together.
                history_key=f"{{{settings.channel_prefix}}}:replay" if settings.replay_max_len else None,
                history_max=settings.replay_max_len,
                history_age=settings.replay_max_age,
                epoch_key=f"{{{settings.channel_prefix}}}:epoch",
                sync_channel=f"{settings.channel_prefix}:sync:{settings.instance_id}",
                name=f"{settings.channel_prefix}:{settings.instance_id}",
                tls=tls,
                topology=topology,
                inbox_max_messages=settings.inbox_max_messages,
                inbox_max_bytes=settings.inbox_max_bytes,
            )
        # Recovery needs the history: with REPLAY_MAX_LEN=0 the opt-in is ignored.
        self.recovery = (
            Recovery(
                self.bus, settings.secret_keys, settings.channel_prefix, settings.recovery_window,
                settings.replay_max_age, concurrency=settings.recovery_concurrency, wait=settings.redis_timeout,
            )
            if settings.replay_max_len
            else None
        )
        self.state = SocketState()
        self.limiter = RateLimiter(settings.socket_rate, settings.socket_burst)
        self.users = UserDirectory(self.bus, settings.channel_prefix)
        # Every sid this process mints starts with its tag: `emit(to=sid)` anywhere in the fleet
        # finds the instance holding the socket from the sid alone. Random per process, so two
        # instances never share one, even with the same INSTANCE_ID.
        sid_tag = base64.b32encode(secrets.token_bytes(5)).decode().lower()
        self.sio.eio.sid_tag = sid_tag
        self.presence = Presence(
            settings.channel_prefix, sid_tag, settings.instance_id,
            redis_url=settings.redis_url, ttl=settings.presence_ttl, timeout=settings.redis_timeout,
            announced_prefixes=self.presence_events, tls=tls, topology=topology,
        )
        self.publisher = Publisher(
            self.bus, settings.channel_prefix, settings.instance_id,
            Outbox(self.bus, settings.outbox_max_messages, settings.outbox_max_age),
        )
        self.propagator = Propagator(
            self.bus,
            self.state,
            self.sio,
            settings.channel_prefix,
            settings.instance_id,
            publisher=self.publisher,
            recovery=self.recovery,
            max_queue=settings.socket_max_queue,
            sid_tag=sid_tag,
            presence=self.presence,
            # Ids are remembered as long as the history keeps entries (a count per partition, an age).
            dedupe_size=settings.replay_max_len or 10_000,
            dedupe_age=settings.replay_max_age,
            drain_timeout=settings.socket_write_timeout,
        )
        self.presence.announce = self._announce_presence
        self.expiry = (
            ExpiryWatch(self._warn_expiring, lambda sid: self.propagator.end_socket(sid, "token_expired"))
            if settings.disconnect_on_token_expiry
            else None
        )
        manager.on_connected = self.propagator.connected
        self.metrics = Metrics(self)  # reads this service: built once the service is
        manager.fleet = self.propagator
        self.sio.connect_reply = self._connect_reply
        # The app's signer when it has one (the project's auth), else one of our own.
        signer: TokenSigner = app.extensions.setdefault("tokens", TokenSigner(settings.secret_keys))
        # Tokens dated on Redis's clock, as revocations are (realtime/directory.py).
        bus = self.bus
        signer.clock = lambda: bus.clock_ms() / 1000
        self.signer = signer
        gateway.register(self, signer)
        for event, handler in self._gateways.items():
            self.sio.on(event, gateway.propagate(self, event)(handler))
        self._initialised = True
        app.extensions[EXTENSION] = self
        app.while_serving(self._serve)

    async def _serve(self) -> AsyncGenerator[None, None]:
        # A peer that stops reading must not hold its connection past SOCKET_WRITE_TIMEOUT.
        serving.bound_writes(self.settings.socket_write_timeout)
        await self.propagator.start()
        watcher: asyncio.Task[None] | None = None
        if self.settings.drain_on_sigterm:
            self._install_sigterm_drain()
            if hypercorn_worker(self.settings.web_concurrency):
                watcher = asyncio.create_task(self._drain_when_listening_stops(), name="listener-watch")
        try:
            yield
        finally:
            await cancel(watcher)
            if self._drain_task is not None:
                await self._drain_task
            await self.sio.eio.shutdown()
            await self.propagator.close()

    async def _drain_when_listening_stops(self) -> None:
        """In one of hypercorn's workers (WEB_CONCURRENCY > 1): hypercorn's parent handles
        SIGTERM by closing every worker's listener at once, then waits for connections to end
        until its graceful timeout. A worker that saw its listener close drains at once, so its
        sockets are told why before they are cut (DRAIN_DELAY cannot apply: new connections are
        refused already)."""
        await serving.listening_stopped()
        if self._drain_task is None:
            log.info("the server stopped listening (hypercorn is shutting down): draining %d sockets", len(self.state))
            self.unready = True
            self._drain_task = asyncio.create_task(self.drain(), name="drain")

    def _connect_reply(self, sid: str) -> dict[str, Any]:
        """What a socket's CONNECT reply carries besides its sid: the pid of a recoverable one."""
        session = self.propagator.sessions.get(sid)
        return {} if session is None else {"pid": session.pid}

    @property
    def ready(self) -> bool:
        return self.bus.ready and not self.draining and not self.unready

    def _warn_expiring(self, sid: str, expires_at: int) -> None:
        self.propagator.send([sid], "token_expiring", {"expires_at": iso(expires_at)})

    async def _announce_presence(self, room: str, user_id: str, status: str) -> None:
        await self.publisher.emit_to_room(room, "presence", {"room": room, "user": user_id, "status": status})

    async def may_join(self, user_id: str | None, room: str) -> bool:
        """Whether the join policy lets a socket of `user_id` join `room` by itself."""
        return await allowed(self.join_policy, user_id, room)

    def refuse_input(self, sid: str, data: Any) -> tuple[str, str] | None:
        """Why a socket's event is refused (code, message), or None to let it through."""
        if not self.limiter.allow(sid):
            return "rate_limited", f"at most {self.limiter.rate:g} events/s (bursts of {self.limiter.burst:g})"
        try:
            size = len(orjson.dumps(data))
        except (TypeError, orjson.JSONEncodeError):
            return "bad_payload", "payloads must be JSON (no binary attachments, nesting at most 254 deep)"
        if size > self.settings.max_payload_bytes:
            return "payload_too_large", f"payloads are limited to {self.settings.max_payload_bytes} bytes"
        return None

    def _install_sigterm_drain(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on a Unix main loop
            log.warning("cannot install the SIGTERM drain on this platform")

    def _on_sigterm(self) -> None:
        if self._drain_task is not None:
            return
        delay = self.settings.drain_delay
        log.info(
            "SIGTERM: not ready now; draining %d sockets in %.1fs, within %.1fs",
            len(self.state), delay, self.settings.shutdown_timeout,
        )
        self.unready = True
        self._drain_task = asyncio.create_task(self._drain_after(delay), name="drain")

    async def _drain_after(self, delay: float) -> None:
        """A load balancer polling /readyz stops sending new connections during `delay`; they
        are still accepted meanwhile. Then the listener closes and the sockets are told."""
        await asyncio.sleep(delay)
        # The server's own SIGINT handling stops it listening and later runs our shutdown hooks.
        os.kill(os.getpid(), signal.SIGINT)
        await self.drain()

    async def drain(self) -> None:
        """Tell every socket why it goes, close it (clients reconnect elsewhere), release channels."""
        self.draining = True
        sids = list(self.state.all_sids())
        notice = {"reason": "instance shutting down", "instance": self.settings.instance_id, "reconnect": True}
        self.propagator.send(sids, "server_shutdown", notice)
        closing = []
        for sid in sids:
            # The transport just ends, after what was queued: every stock client sees a lost
            # transport and reconnects by itself.
            ending = self.propagator.writer.close(sid, "server shutting down")
            if ending is not None:
                closing.append(ending)
        try:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), self.settings.shutdown_timeout)
        except TimeoutError:
            log.warning("drain deadline passed with %d sockets still open", len(self.state))
        log.info("drained; %d sockets left", len(self.state))

    # --- what the REST hooks, gateways and server code ask of the fleet --------------------------
    # Each raises BusUnavailable when the bus did not confirm it (it may or may not have happened).

    async def emit(
        self, scope: Scope, event: str, data: Any, *, user_id: str | None = None, room: str | None = None
    ) -> str:
        """Send an event to a scope on every instance; its envelope id."""
        return await self.publisher.publish(self.publisher.addressed(scope, event, data, user_id=user_id, room=room))

    def addressed(
        self, scope: Scope, event: str, data: Any, *, user_id: str | None = None, room: str | None = None
    ) -> Outgoing:
        """An event encoded for a scope, to publish with others (TypeError for data JSON cannot carry)."""
        return self.publisher.addressed(scope, event, data, user_id=user_id, room=room)

    async def emit_many(self, outgoing: list[Outgoing]) -> None:
        """Publish encoded events together, in one round trip per partition."""
        await self.publisher.publish_many(outgoing)

    async def user_rooms(self, user_id: str) -> set[str]:
        """The rooms the backend put a user in."""
        return await self.users.rooms(user_id)

    async def put_in_room(self, user_id: str, room: str, *, member: bool = True) -> bool:
        """Store that a user is (or, with `member=False`, is not) in a room, then have every
        instance apply it to the user's live sockets; True when the stored record changed.
        Both steps are idempotent: retry on BusUnavailable."""
        store = self.users.add_room if member else self.users.remove_room
        changed = await store(user_id, room)
        await self.publisher.publish_op("join" if member else "leave", user_id=user_id, room=room)
        return changed

    async def disconnect_user(self, user_id: str, reason: str) -> str:
        """Disconnect every socket of a user, each told `reason` first."""
        return await self.publisher.publish_op("disconnect", user_id=user_id, reason=reason)

    async def revoke(self, user_id: str) -> tuple[str, float]:
        """Refuse the user's tokens minted before now and disconnect its sockets: the op's id and
        the moment tokens must be minted after."""
        not_before = await self.users.revoke(user_id)
        return await self.disconnect_user(user_id, "token revoked"), not_before

    def status(self) -> dict[str, Any]:
        return {
            "bus": self.bus.status(),
            **self.propagator.status(),
            "draining": self.draining,
            "rate_limited": self.limiter.refused,
            "malformed_packets": self.sio.malformed_packets,
            "presence": self.presence.status(),
            "tasks": _live_tasks(),
            "websocket": {**frames.WRITTEN.status(), "cut_off": self.sio.eio.cut_off},
        }


def _live_tasks() -> int:
    """Tasks alive in the serving loop: a leak shows here first (a task per connection that
    never ends). 0 when no loop runs (the metrics registry asks once, at start-up)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def realtime() -> Realtime:
    """The current app's Realtime service, or a clear error when it was never set up."""
    try:
        return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError("Realtime is not initialised on this app: call Realtime(app) first") from None


def mount(app: Quart) -> socketio.ASGIApp:
    """Serve Socket.IO at /socket.io/ and everything else with Quart.

    No on_startup/on_shutdown here: ASGIApp forwards lifespan to Quart only without them.
    """
    service: Realtime = app.extensions[EXTENSION]
    return socketio.ASGIApp(service.sio, other_asgi_app=app)

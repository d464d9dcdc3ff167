"""The three delivery scopes across instances, and delivery of consumed envelopes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from . import envelope
from .bus import Bus
from .outbox import Outbox
from .state import SocketState

log = logging.getLogger(__name__)

NAMESPACE = "/"


class Propagator:
    """Publishes events for every instance and delivers the ones this instance consumes."""

    def __init__(
        self,
        bus: Bus,
        state: SocketState,
        sio: socketio.AsyncServer,
        prefix: str,
        instance_id: str,
        *,
        outbox: Outbox,
        max_queue: int = 1000,
    ) -> None:
        self.bus = bus
        self.state = state
        self.sio = sio
        self.instance_id = instance_id
        self.outbox = outbox
        self.max_queue = max_queue
        self.slow_evicted = 0
        self.swept = 0
        self._evictions: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Future[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.channel_all = f"{prefix}:all"
        self.channel_authenticated = f"{prefix}:authenticated"
        self._user_prefix = f"{prefix}:user:"
        self._user_locks = _KeyedLocks()
        self.delivered = 0
        self.dropped = 0
        self._last_drop_log = 0.0

    def user_channel(self, user_id: str) -> str:
        return self._user_prefix + user_id

    async def start(self) -> None:
        await self.bus.start(self.on_message)
        self.outbox.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(10.0), name="state-sweeper")
        await self.bus.subscribe(self.channel_all)
        await self.bus.subscribe(self.channel_authenticated)

    async def close(self) -> None:
        tasks = [*self._evictions, *self._pending, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        await self.outbox.close()
        await self.bus.close()

    # --- sockets coming and going -------------------------------------------------------

    async def attach(self, sid: str, user_id: str | None) -> None:
        """Register a socket; for a user's first socket here, hold its channel first."""
        if user_id is None:
            self.state.add(sid, None)
        else:
            await self._to_the_end(self._attach(sid, user_id))

    async def detach(self, sid: str) -> None:
        """Forget a socket; release its user's channel when it was the last one here."""
        user_id, last = self.state.remove(sid)
        if user_id is not None and last:
            await self._to_the_end(self._release(user_id))

    async def _attach(self, sid: str, user_id: str) -> None:
        async with self._user_locks.hold(user_id):
            if not self.state.holds_user(user_id):
                await self.bus.subscribe(self.user_channel(user_id))
            self.state.add(sid, user_id)

    async def _release(self, user_id: str) -> None:
        async with self._user_locks.hold(user_id):
            # A new socket of the same user may have arrived while we waited.
            if not self.state.holds_user(user_id):
                await self.bus.unsubscribe(self.user_channel(user_id))

    async def _to_the_end(self, work: Coroutine[Any, Any, None]) -> None:
        """Run subscription bookkeeping to completion even if the handler awaiting it is
        cancelled (a client that vanishes mid-handshake): half of it would leak a channel."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _sweep_forever(self, every: float) -> None:
        """Safety net: forget sockets the Socket.IO server no longer knows (a connection that
        died inside its connect handler never gets a disconnect call)."""
        while True:
            await asyncio.sleep(every)
            for sid in list(self.state.all_sids()):
                if self.sio.manager.eio_sid_from_sid(sid, NAMESPACE) is None:
                    self.swept += 1
                    await self.detach(sid)

    # --- publishing -------------------------------------------------------------------------

    async def emit_to_user(
        self, user_id: str, event: str, data: Any, *, origin_sid: str | None = None
    ) -> str:
        """Send to every socket of `user_id` on every instance, except `origin_sid`."""
        envelope_id, raw = envelope.make(
            "user", event, data, user_id=user_id, instance=self.instance_id, sid=origin_sid
        )
        await self.bus.publish(self.user_channel(user_id), raw)
        return envelope_id

    async def propagate_answer(self, user_id: str, raw: bytes) -> bool:
        """Publish a gateway answer already encoded as an envelope; held in the outbox while
        the bus is down. False when the outbox had to drop it."""
        return await self.outbox.publish(self.user_channel(user_id), raw)

    def answer_envelope(self, user_id: str, event: str, data: Any, origin_sid: str) -> bytes:
        """Encode an answer for the user's other sockets (raises TypeError for non-JSON data)."""
        return envelope.make(
            "user", event, data, user_id=user_id, instance=self.instance_id, sid=origin_sid
        )[1]

    async def emit_to_all(self, event: str, data: Any) -> str:
        """Send to every connected socket on every instance, anonymous ones included."""
        envelope_id, raw = envelope.make("all", event, data, instance=self.instance_id)
        await self.bus.publish(self.channel_all, raw)
        return envelope_id

    async def emit_to_authenticated(self, event: str, data: Any) -> str:
        """Send to every socket that has a user, on every instance."""
        envelope_id, raw = envelope.make("authenticated", event, data, instance=self.instance_id)
        await self.bus.publish(self.channel_authenticated, raw)
        return envelope_id

    # --- consuming ----------------------------------------------------------------------

    async def on_message(self, channel: str, raw: bytes) -> None:
        """Deliver one consumed message to the local sockets it addresses; drop garbage."""
        try:
            env = envelope.parse(raw)
        except envelope.BadEnvelope as exc:
            self._drop(channel, str(exc))
            return
        if env.scope == "user":
            if channel != self.user_channel(env.user_id or ""):
                self._drop(channel, "user envelope on a channel that is not its user's")
                return
            sids: Iterable[str] = self.state.sids_of(env.user_id or "")
            skip = env.origin.sid
            if skip is not None:
                sids = [sid for sid in sids if sid != skip]
        elif env.scope == "all" and channel == self.channel_all:
            sids = self.state.all_sids()
        elif env.scope == "authenticated" and channel == self.channel_authenticated:
            sids = self.state.authenticated_sids()
        else:
            self._drop(channel, f"{env.scope} envelope on the wrong channel")
            return
        await self.send(list(sids), env.event, env.data)

    async def send(self, sids: list[str], event: str, data: Any) -> None:
        """Encode one Socket.IO packet and queue it for each socket (as rooms do)."""
        if not sids:
            return
        pkt = self.sio.packet_class(sio_packet.EVENT, namespace=NAMESPACE, data=[event, data])
        encoded = pkt.encode()
        parts = encoded if isinstance(encoded, list) else [encoded]
        # Shared by every recipient: an Engine.IO packet caches its encoding, so each frame is
        # built once per broadcast, not once per socket.
        eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts]
        manager, sockets = self.sio.manager, self.sio.eio.sockets
        for sid in sids:
            sock = sockets.get(manager.eio_sid_from_sid(sid, NAMESPACE))
            if sock is None or sock.closing or sock.closed:
                continue
            if sock.queue.qsize() >= self.max_queue:
                self._evict(sock, sid)
                continue
            # Straight onto the socket's queue: never blocks on a slow reader, and skips the
            # library's per-packet ping check (its service task checks pings anyway).
            for eio_pkt in eio_pkts:
                sock.queue.put_nowait(eio_pkt)
            self.delivered += 1

    def _evict(self, sock: Any, sid: str) -> None:
        """Disconnect a socket that stopped reading; its queue stays at the bound it reached."""
        self.slow_evicted += 1
        log.warning("socket %s stopped reading (%d packets queued); disconnecting it", sid, sock.queue.qsize())
        task = asyncio.create_task(sock.close(wait=False, abort=True, reason="slow consumer"))
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    def _drop(self, channel: str, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 5.0:  # rate-limited: garbage must not flood the log
            self._last_drop_log = now
            log.warning("dropped a message on %s (%s); %d dropped so far", channel, why, self.dropped)

    def status(self) -> dict[str, Any]:
        return {
            "sockets": len(self.state),
            "users": len(self.state.users()),
            "delivered": self.delivered,
            "dropped_invalid": self.dropped,
            "slow_consumers_evicted": self.slow_evicted,
            "swept": self.swept,
            "outbox": self.outbox.status(),
        }


class _KeyedLocks:
    """One asyncio.Lock per key, existing only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

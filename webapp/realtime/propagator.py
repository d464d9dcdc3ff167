"""Delivery across instances: the three scopes, rooms and single sockets, and the ops that
change who is in which room or connected at all.

The scopes, their channels and recipients are rows of `scopes.py`; who was a member of a
channel at an event's offset is `membership.py`'s answer, asked of every delivery, catch-up
and replay alike.

Sockets that opted in to recovery get their position as a last argument of each event (the
event's offset, or on a cluster an offset per partition), their missed events right after
their CONNECT reply, and nothing live before those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

import socketio

from ..names import is_room_name
from . import envelope, scopes
from .bus import Bus, BusUnavailable, Mark, Position
from .delivery import Frames, Writer
from .membership import Membership, RecentIds, plan_replay
from .presence import Presence
from .publisher import Publisher
from .recovery import Recovery, Request, Session
from .state import SocketState

log = logging.getLogger(__name__)

NAMESPACE = "/"
AUTHENTICATED_ROOM = scopes.AUTHENTICATED_ROOM
USER_ROOM_PREFIX = scopes.USER_ROOM_PREFIX
reserved_room = scopes.reserved


class SubscriptionFailed(Exception):
    """Redis is there but did not confirm a user's channel: the socket must not be accepted."""


Delivery = tuple[str, Any, "Mark | None", "str | None"]  # event, data, where the bus holds it, its channel


class _Local:
    """This instance's sockets, as the scope table reads them."""

    def __init__(self, state: SocketState, sio: socketio.AsyncServer) -> None:
        self._state = state
        self._sio = sio

    def all_sids(self) -> Iterable[str]:
        return self._state.all_sids()

    def authenticated_sids(self) -> Iterable[str]:
        return self._state.authenticated_sids()

    def sids_of(self, user_id: str) -> Iterable[str]:
        return self._state.sids_of(user_id)

    def room_members(self, room: str) -> Iterable[str]:
        return [sid for sid, _ in self._sio.manager.get_participants(NAMESPACE, room)]

    def holds(self, sid: str) -> bool:
        return sid in self._state


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
        publisher: Publisher,
        recovery: Recovery | None = None,
        max_queue: int = 1000,
        sid_tag: str = "",
        presence: Presence | None = None,
        dedupe_size: int = 10_000,
        dedupe_age: float = 300.0,
        drain_timeout: float = 10.0,
    ) -> None:
        """`dedupe_size` and `dedupe_age`: how long envelope ids are remembered to drop a
        message Redis applied twice (as long as the history keeps its entries)."""
        self.bus = bus
        self.state = state
        self.sio = sio
        self.instance_id = instance_id
        self.sid_tag = sid_tag
        self.presence = presence
        self._in_rooms: dict[str, set[str]] = {}  # sid -> rooms it is counted in by presence
        self.publisher = publisher
        self.recovery = recovery
        self.writer = Writer(sio, max_queue)
        self.drain_timeout = drain_timeout  # a replaying socket's queue must drain within it
        # Live events for a socket whose replay is under way, at most (past it: a slow consumer).
        self.max_waiting = max(max_queue, dedupe_size)
        # Opted-in sockets, and sockets whose CONNECT reply is not out yet (their deliveries wait).
        self.sessions: dict[str, Session] = {}
        self._connecting: dict[str, list[Delivery]] = {}
        self._seen = RecentIds(dedupe_size, dedupe_age)
        self.members = Membership(bus)
        self._local = _Local(state, sio)
        self.prefix = prefix
        self._records: set[asyncio.Task[None]] = set()
        self.deduplicated = 0
        self.gap_notices = 0
        self.swept = 0
        self._pending: set[asyncio.Future[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.channel_all = scopes.channel(prefix, "all")
        self.channel_authenticated = scopes.channel(prefix, "authenticated")
        self._user_prefix = scopes.channel(prefix, "user", user_id="")
        self._room_prefix = scopes.channel(prefix, "room", room="")
        self.node_channel = scopes.channel(prefix, "sid", to=sid_tag)
        self._locks = _KeyedLocks()  # per channel: holding and releasing it never interleave
        self._ops: set[asyncio.Task[None]] = set()
        self.dropped = 0
        # For metrics: deliveries by scope, and an optional timer (webapp/metrics.py sets it;
        # None costs nothing).
        self.deliveries_by_scope: Counter[str] = Counter({name: 0 for name in scopes.ROWS})
        self.observe_lag: Callable[[float], None] | None = None
        self._last_drop_log = 0.0

    def user_channel(self, user_id: str) -> str:
        return self._user_prefix + user_id

    def room_channel(self, room: str) -> str:
        return self._room_prefix + room

    def node_channel_of(self, sid: str) -> str:
        """The channel of the instance holding `sid`: its tag is the sid's first part."""
        return scopes.channel(self.prefix, "sid", to=sid)

    async def start(self) -> None:
        await self.bus.start(self.on_message, self.on_gap)
        if self.presence is not None:
            await self.presence.start()
        self.publisher.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(10.0), name="state-sweeper")
        await self.bus.subscribe(self.channel_all)
        await self.bus.subscribe(self.channel_authenticated)
        await self.bus.subscribe(self.node_channel)

    async def close(self) -> None:
        if self._records:  # how sessions ended: a drained client recovers with them
            await asyncio.wait(self._records, timeout=5.0)
        tasks = [
            *self._records, *self._pending, *self._ops,
            *([self._sweeper] if self._sweeper else []),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.writer.stop()
        self._sweeper = None
        if self.presence is not None:
            await self.presence.close()  # while the bus still runs: its leaves are announced
        await self.publisher.close()
        await self.bus.close()

    # --- sockets coming and going -------------------------------------------------------

    async def attach(
        self,
        sid: str,
        user_id: str | None,
        recovery: Request | None = None,
        rooms: Awaitable[set[str]] | None = None,
    ) -> None:
        """Register a socket during its handshake; for a user's first socket here, hold its
        channel first (SubscriptionFailed when Redis does not confirm it), then enter `rooms`
        (the ones the backend gave its user, read meanwhile). Its deliveries wait until
        `connected` says its CONNECT reply is out."""
        await self._to_the_end(self._attach(sid, user_id, recovery, rooms))

    async def _attach(
        self, sid: str, user_id: str | None, request: Request | None, rooms: Awaitable[set[str]] | None
    ) -> None:
        self._connecting[sid] = []
        manager = self.sio.manager
        try:
            if user_id is None:
                self.state.add(sid, None)
            else:
                channel = self.user_channel(user_id)
                async with self._locks.hold(channel):
                    if not self.state.holds_user(user_id):
                        await self._hold(channel)
                    self.state.add(sid, user_id)
                if self.presence is not None:
                    self.presence.socket_connected(user_id)
                manager.basic_enter_room(sid, NAMESPACE, USER_ROOM_PREFIX + user_id)
                manager.basic_enter_room(sid, NAMESPACE, AUTHENTICATED_ROOM)
            self.members.connected(sid, self.channels_of(sid))
            given = {room for room in await rooms if is_room_name(room)} if rooms is not None else set()
            for room in given:
                await self.enter_room(sid, room, by_backend=True)
            if request is not None and self.recovery is not None:
                self.sessions[sid] = await self._open_session(sid, user_id, request, given)
        except BaseException:
            self._connecting.pop(sid, None)
            if sid in self.state:
                await self._forget(sid)
            raise

    async def _open_session(self, sid: str, user_id: str | None, request: Request, given: set[str]) -> Session:
        """Open a recoverable session; a resumed one gets the rooms its socket was in back
        before the history is read, so nothing sent to them in between is missed. The history's
        ops then say where each membership stood: a room the backend took away meanwhile is
        left again, one it gave counts from the op that gave it."""
        entered: set[str] = set()

        async def rejoin(rooms: Iterable[str]) -> list[str]:
            for room in rooms:
                if is_room_name(room) and not scopes.reserved(room) and room not in given:
                    await self.enter_room(sid, room, by_backend=True)
                    entered.add(room)
            return self.channels_of(sid)

        assert self.recovery is not None
        session = await self.recovery.open(sid, user_id, request, rejoin, self.channels_of(sid))
        if session.failure is not None or not session.resumed:
            for room in entered:  # a fresh start: without the rooms of the old session
                await self.leave_room(sid, room, by_backend=True)
            session.rooms = {room: self.members.since(sid, self.room_channel(room)) for room in given}
            if session.rooms:
                await self._keep_rooms(session)  # a resume must know when these began
            return session
        plan = plan_replay(
            session.replay_entries,
            home=self._at_home,
            room_channel=self.room_channel,
            user_id=user_id,
            origin=session.origin,
            kept=session.rooms,
            given=given,
        )
        self.deduplicated += plan.duplicates
        session.replay = plan.entries
        for room in plan.ended:
            if self.members.since(sid, self.room_channel(room)) is not None:
                await self.leave_room(sid, room, by_backend=True)
        kept = session.rooms
        session.rooms = {
            room: kept.get(room) or self.members.since(sid, self.room_channel(room))
            for room in plan.rooms - plan.ended
            if self.members.since(sid, self.room_channel(room)) is not None
        }
        await self._keep_rooms(session)
        return session

    async def _hold(self, channel: str) -> None:
        try:
            await self.bus.subscribe(channel)  # False (Redis unreachable): made on recovery
        except BusUnavailable as exc:
            await self.bus.unsubscribe(channel)
            raise SubscriptionFailed(str(exc)) from None

    def channels_of(self, sid: str) -> list[str]:
        """The channels whose events reach a socket, as rooms stand now."""
        user_id = self.state.user_of(sid)
        channels = [self.channel_all]
        if user_id is not None:
            channels += [self.channel_authenticated, self.user_channel(user_id)]
        channels += [self.room_channel(room) for room in self.rooms_of(sid)]
        return channels

    def rooms_of(self, sid: str) -> list[str]:
        """The rooms a local socket is in, besides its own sid room and the scopes' rooms."""
        return [
            room for room in self.sio.manager.get_rooms(sid, NAMESPACE)
            if room != sid and not reserved_room(room)
        ]

    # --- rooms --------------------------------------------------------------------------------

    def _members_here(self, room: str) -> bool:
        return bool(self.sio.manager.rooms.get(NAMESPACE, {}).get(room))

    async def enter_room(self, sid: str, room: str, *, by_backend: bool = False) -> None:
        """Put a socket of this instance in a room; the room's channel is held (confirmed by
        Redis) before it returns. SubscriptionFailed when Redis does not confirm it."""
        await self._to_the_end(self._enter_room(sid, room, by_backend))

    async def _enter_room(self, sid: str, room: str, by_backend: bool) -> None:
        channel = self.room_channel(room)
        manager = self.sio.manager
        async with self._locks.hold(channel):
            if manager.eio_sid_from_sid(sid, NAMESPACE) is None:
                return  # gone meanwhile
            fresh = not self._members_here(room)
            if fresh:
                await self._hold(channel)
            at = await self.members.now(channel, fresh=fresh) if self.members.since(sid, channel) is None else None
            eio_sid = manager.eio_sid_from_sid(sid, NAMESPACE)
            if eio_sid is None or sid not in self.state:
                # It left while Redis confirmed the channel: nothing of it may stay behind.
                if not self._members_here(room):
                    await self.bus.unsubscribe(channel)
                return
            manager.basic_enter_room(sid, NAMESPACE, room, eio_sid=eio_sid)
            if at is not None:
                self.members.joined(sid, channel, at)
        self._count_in(sid, room)
        session = self.sessions.get(sid)
        if session is not None and room not in session.rooms:
            # Every room, however joined: a resume replays a room only from the offset it began at.
            session.rooms[room] = self.members.since(sid, channel)
            await self._keep_rooms(session)

    async def leave_room(self, sid: str, room: str, *, by_backend: bool = False) -> None:
        """Take a socket of this instance out of a room; release the channel if it was the last."""
        self.sio.manager.basic_leave_room(sid, NAMESPACE, room)
        self.members.left(sid, self.room_channel(room))
        self._count_out(sid, room)
        session = self.sessions.get(sid)
        if session is not None and room in session.rooms:
            # However it was joined: a room the backend took away must not come back on a resume.
            del session.rooms[room]
            await self._keep_rooms(session)
        await self.release_room(room)

    async def release_room(self, room: str) -> None:
        """Stop holding a room's channel once no socket here is in it."""
        if not self._members_here(room):
            await self._to_the_end(self._release(self.room_channel(room), lambda: self._members_here(room)))

    def _count_in(self, sid: str, room: str) -> None:
        """Presence counts a signed-in socket once per room it is in."""
        user_id = self.state.user_of(sid)
        if self.presence is None or user_id is None:
            return
        rooms = self._in_rooms.setdefault(sid, set())
        if room not in rooms:
            rooms.add(room)
            self.presence.entered(room, user_id)

    def _count_out(self, sid: str, room: str) -> None:
        rooms = self._in_rooms.get(sid)
        user_id = self.state.user_of(sid)
        if self.presence is None or rooms is None or room not in rooms or user_id is None:
            return
        rooms.discard(room)
        if not rooms:
            del self._in_rooms[sid]
        self.presence.left(room, user_id)

    async def _keep_rooms(self, session: Session) -> None:
        """Write a session's rooms before a change is acknowledged: a SIGKILL right after a
        join or a leave must not resume the session with the rooms of before. One write at a
        time, each of the newest set, so an older set never lands after a newer one."""
        if self.recovery is None:
            return
        session.rooms_version += 1
        mine = session.rooms_version
        async with session.rooms_lock:
            if session.rooms_written >= mine:
                return  # a write that started after this change has landed
            version = session.rooms_version
            await self.recovery.keep_rooms(session)
            session.rooms_written = version

    async def connected(self, sid: str) -> None:
        """The socket's CONNECT reply is out: send what it missed, then what waited for it.

        A replay follows the socket's reader (a chunk, then its queue drained), so a client
        that reads as fast as it can is never taken for a slow consumer; live events wait
        meanwhile, and go out after it, in order."""
        session = self.sessions.get(sid)
        if session is not None and session.replay:
            task = asyncio.ensure_future(self._replay_then_go_live(sid, session))
            self._ops.add(task)
            task.add_done_callback(self._ops.discard)
            return
        self._go_live(sid, session, 0)

    async def _replay_then_go_live(self, sid: str, session: Session) -> None:
        chunk = max(1, self.writer.max_queue // 2)
        sent = 0
        for start in range(0, len(session.replay), chunk):
            if start and not await self.writer.drain(sid, self.drain_timeout):
                if sid in self._connecting:  # still here, not reading: what it would be live too
                    self.writer.evict(sid)
                return
            for entry, env in session.replay[start:start + chunk]:
                session.sent.advance(entry.mark)
                self.writer.write(sid, self.writer.encode(env.event or "", env.data, str(session.sent)))
                sent += 1
        self._go_live(sid, session, sent)

    def _go_live(self, sid: str, session: Session | None, missed: int) -> None:
        waiting = self._connecting.pop(sid, None)
        if session is not None:
            if session.failure is not None:
                self.send([sid], "recovery_failed", {"reason": session.failure})
            elif session.replay_entries or missed:  # its channels carried something meanwhile
                self.send([sid], "recovered", {"missed": missed})
            session.replay = []
            session.replay_entries = []
        for event, data, mark, channel in waiting or ():
            # Membership may have changed meanwhile (a resume leaves rooms taken away).
            if channel is None or self._still_member(sid, channel):
                self.deliver([sid], event, data, mark, channel)

    def _still_member(self, sid: str, channel: str) -> bool:
        return not channel.startswith(self._room_prefix) or self.members.since(sid, channel) is not None

    def origin_of(self, sid: str) -> str:
        """The sid a socket's gateway answers carry: stable across a session's recoveries."""
        session = self.sessions.get(sid)
        return sid if session is None else session.origin

    async def detach(self, sid: str) -> None:
        """Forget a socket; release its user's channel when it was the last one here."""
        self._connecting.pop(sid, None)
        session = self.sessions.get(sid)
        if session is not None and self.recovery is not None:
            # Still attached while the bus catches up to now, so what it was sent is all it
            # was addressed by up to that position (an idle socket's old offset needs this).
            position: Position | None
            try:
                position = await self.bus.sync()
            except BusUnavailable:
                position = self.bus.position  # older, so the record claims less: still true
            self._record(self.recovery.ended(session, position))
        self.sessions.pop(sid, None)
        await self._forget(sid)

    def _record(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    async def _forget(self, sid: str) -> None:
        self.members.forget(sid)
        if self.presence is not None and self.state.user_of(sid) is not None:
            for room in list(self._in_rooms.get(sid, ())):
                self._count_out(sid, room)
            self.presence.socket_disconnected(self.state.user_of(sid) or "")
        user_id, last = self.state.remove(sid)
        if user_id is not None and last:
            await self._to_the_end(
                self._release(self.user_channel(user_id), lambda: self.state.holds_user(user_id))
            )

    async def _release(self, channel: str, needed: Callable[[], bool]) -> None:
        async with self._locks.hold(channel):
            # A new socket may have come for it while we waited.
            if not needed():
                await self.bus.unsubscribe(channel)

    async def _to_the_end(self, work: Coroutine[Any, Any, None]) -> None:
        """Run subscription bookkeeping to completion even if the handler awaiting it is
        cancelled (a client that vanishes mid-handshake): half of it would leak a channel."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _sweep_forever(self, every: float) -> None:
        """Safety net: forget sockets whose connection is gone. One that died inside its connect
        handler never gets a disconnect call, and the manager may still map its sid, so the
        Engine.IO socket itself is checked."""
        while True:
            await asyncio.sleep(every)
            for sid in list(self.state.all_sids()):
                if self.writer.gone(sid):
                    self.swept += 1
                    await self.detach(sid)

    # --- consuming ----------------------------------------------------------------------

    async def on_message(self, channel: str, raw: bytes, mark: Mark | None) -> None:
        """Deliver one consumed message to the local sockets it addresses; drop garbage."""
        env = self._addressed(channel, raw)
        if env is None:
            return
        if self._seen.seen(env.id, mark):
            self.deduplicated += 1  # a batch Redis applied although its reply was lost, then retried
            return
        if env.op != "emit":
            await self._apply(env)
            return
        sids = self.members.entitled(self._recipients(env), channel, mark)
        self.deliveries_by_scope[env.scope] += len(sids)
        if self.observe_lag is not None:
            self.observe_lag(max(0.0, time.time() - env.ts))
        self.deliver(sids, env.event or "", env.data, mark, channel)

    def _recipients(self, env: envelope.Envelope) -> list[str]:
        """The local sockets an envelope addresses."""
        sids: Iterable[str] = scopes.row(env.scope).recipients(self._local, env)
        if env.scope == "user" and env.origin.sid is not None:
            origin = env.origin.sid
            sids = [sid for sid in sids if self.origin_of(sid) != origin]
        if env.skip:
            skip = set(env.skip)
            return [sid for sid in sids if sid not in skip]
        return list(sids)

    async def _apply(self, env: envelope.Envelope) -> None:
        """Carry out an op on the local sockets it names."""
        targets = self._recipients(env)
        if env.op == "disconnect":
            for sid in targets:
                self.end_socket(sid, env.reason or "disconnected by the server")
            return
        for sid in targets:
            try:
                if env.op == "join" and env.room is not None:
                    await self.enter_room(sid, env.room, by_backend=env.scope == "user")
                elif env.op == "leave" and env.room is not None:
                    await self.leave_room(sid, env.room, by_backend=env.scope == "user")
                elif env.op == "close" and env.room is not None:
                    await self.leave_room(sid, env.room)
            except SubscriptionFailed as exc:
                log.warning("socket %s could not join %s: %s", sid, env.room, exc)
            except Exception:  # one socket's failure must not skip the op's other sockets
                log.exception("applying %s of %s to socket %s failed", env.op, env.room, sid)

    def end_socket(self, sid: str, reason: str) -> None:
        """Tell a local socket why (`disconnect_reason`), then disconnect it at the Socket.IO
        level, after which the official clients do not reconnect by themselves.

        Not awaited by the caller: a socket's departure syncs with the bus, and the caller may be
        the bus's own consumer."""
        self.send([sid], "disconnect_reason", {"reason": reason})
        task = asyncio.ensure_future(self.sio.disconnect(sid))
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    def _addressed(self, channel: str, raw: bytes) -> envelope.Envelope | None:
        """The envelope in a message, if it is valid and on its scope's channel; else dropped."""
        try:
            env = envelope.parse(raw)
        except envelope.BadEnvelope as exc:
            self._drop(channel, str(exc))
            return None
        if not self._at_home(channel, env):
            self._drop(channel, f"{env.scope} envelope on a channel that is not its scope's")
            return None
        return env

    def _at_home(self, channel: str, env: envelope.Envelope) -> bool:
        """Whether an envelope came on its scope's own channel (anyone can publish on ours)."""
        return channel == scopes.row(env.scope).channel(self.prefix, env)

    async def on_gap(self, reason: str) -> None:
        """The bus lost events it cannot replay: recoverable sockets must refetch their state."""
        self.gap_notices += 1
        self.send(list(self.sessions), "recovery_failed", {"reason": reason})

    def send(self, sids: list[str], event: str, data: Any) -> None:
        """Send an event straight to local sockets (no bus): answers, errors, notices."""
        self.deliver(sids, event, data, None)

    def deliver(self, sids: list[str], event: str, data: Any, mark: Mark | None, channel: str | None = None) -> None:
        """Encode one Socket.IO packet and queue it for each socket (as rooms do).

        Recoverable sockets get their position as a last argument (one more encoding, shared
        by all of them on one Redis node, and by those holding the same position on a
        cluster); a message without one (sent directly, or published outside the history)
        carries the position each such socket already holds.
        """
        if not sids:
            return
        if not self.sessions and not self._connecting:
            frames = self.writer.encode(event, data, None)
            for sid in sids:
                self.writer.write(sid, frames)
            return
        plain: Frames | None = None
        stamped: dict[str, Frames] = {}
        # One partition: a socket's position is the event's offset, the same for everyone.
        shared = str(mark.offset) if mark is not None and self.bus.partitions == 1 else None
        for sid in sids:
            waiting = self._connecting.get(sid)
            if waiting is not None:
                if len(waiting) >= self.max_waiting:  # a replay under way, outpaced by live events
                    self.writer.evict(sid)
                    continue
                waiting.append((event, data, mark, channel))
                continue
            session = self.sessions.get(sid)
            if session is None:
                plain = plain or self.writer.encode(event, data, None)
                self.writer.write(sid, plain)
            elif mark is None:
                self.writer.write(sid, self.writer.encode(event, data, str(session.sent)))
            elif not session.floor.covers(mark):
                session.sent.advance(mark)
                stamp = shared or str(session.sent)
                if stamp not in stamped:
                    stamped[stamp] = self.writer.encode(event, data, stamp)
                self.writer.write(sid, stamped[stamp])

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
            # Sockets listed in python-socketio's room table, rooms of their own included: a
            # socket gone from `sockets` but not from here is a leak.
            "room_entries": sum(len(members) for members in self.sio.manager.rooms.get(NAMESPACE, {}).values()),
            "delivered": self.writer.delivered,
            "dropped_invalid": self.dropped,
            "slow_consumers_evicted": self.writer.slow_evicted,
            "swept": self.swept,
            "recoverable_sockets": len(self.sessions),
            "deduplicated": self.deduplicated,
            "gap_notices": self.gap_notices,
            **({"recovery": self.recovery.status()} if self.recovery is not None else {}),
            "outbox": self.publisher.outbox.status(),
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

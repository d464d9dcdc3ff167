"""The chaos soak's sockets and traffic: python-socketio clients whose sessions the oracle follows, and the REST emitter."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import aiohttp
import socketio

from webapp.client import RecoveringClient

from .chaos_fleet import API_KEY, Fleet, Slot
from .chaos_oracle import SLACK, Emit, Membership, Session

BACKEND_ROOMS = ("team:red", "team:blue")  # given by the backend (PUT /api/users/<id>/rooms/<room>)
PUBLIC_ROOMS = ("public:lobby", "public:games")  # joined by the sockets themselves (the demo's policy)
ROOMS = (*BACKEND_ROOMS, *PUBLIC_ROOMS)
WAIT = 10.0  # bound on every wait for one event (an ack, a fence)
RECONNECT_BOUND = 60.0  # a client not back within this long is a finding
UNKNOWN = 2**32 - 1  # the emit id recorded for an event that names no emit of this run
REQUEST_TIMEOUT = 8.0  # REDIS_TIMEOUT is 2 s: an instance under load still answers well within this


class Gates:
    """Per room: emits to it pass together; a membership change waits for them and holds new
    ones back, so that no event of the room is in flight while who is in it changes."""

    def __init__(self) -> None:
        self._busy: Counter[str] = Counter()
        self._closed: set[str] = set()
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def emitting(self, rooms: Iterable[str]) -> AsyncIterator[None]:
        wanted = set(rooms)
        async with self._changed:
            await self._changed.wait_for(lambda: not wanted & self._closed)
            self._busy.update(wanted)
        try:
            yield
        finally:
            async with self._changed:
                self._busy.subtract(wanted)
                self._changed.notify_all()

    @asynccontextmanager
    async def changing(self, room: str) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: room not in self._closed)
            self._closed.add(room)
            await self._changed.wait_for(lambda: self._busy[room] <= 0)
        try:
            yield
        finally:
            async with self._changed:
                self._closed.discard(room)
                self._changed.notify_all()


class World:
    """What the soak's parts share: the fleet, one HTTP session, the records, the locks."""

    def __init__(self, fleet: Fleet, http: aiohttp.ClientSession, rng: random.Random, tag: str) -> None:
        self.fleet = fleet
        self.http = http
        self.rng = rng
        self.tag = tag
        self.emits: list[Emit] = []
        self.sessions: list[Session] = []
        self.clients: list[Client] = []
        self.fault = 0  # the fault under way (0: none)
        self.gates = Gates()
        self._user_locks: dict[str, asyncio.Lock] = {}
        self.tokens: dict[str, str] = {}
        self.backend_rooms: dict[str, set[str]] = {}  # what the backend gave each user
        self.record_rooms: dict[str, set[str]] = {}  # what Redis's record of each user holds now
        self.failures: list[str] = []  # breaches of the contract found on the way
        self.notes: Counter[str] = Counter()  # what happened, not wrong in itself
        self.recovery_failed: Counter[tuple[int, str]] = Counter()  # (fault, reason)
        self.reconnects: Counter[tuple[int, str]] = Counter()  # (fault, "resumed" or "fresh")
        self.hung: Counter[str] = Counter()  # per instance process: REST calls it never answered
        self._fences = itertools.count()
        self.stopping = False

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def user_lock(self, user: str | None) -> asyncio.Lock:
        """Serialises a user's (re)connections with the backend changing the user's rooms."""
        return self._user_locks.setdefault(user or "", asyncio.Lock())

    def pick(self) -> Slot | None:
        up = self.fleet.up()
        return self.rng.choice(up) if up else None

    def marker(self, emit_id: int) -> str:
        return f"{self.tag}-{emit_id}"

    def emit_id(self, data: Any) -> int:
        if isinstance(data, str) and data.startswith(self.tag + "-"):
            try:
                value = int(data[len(self.tag) + 1:])
            except ValueError:
                return UNKNOWN
            return value if value < len(self.emits) else UNKNOWN
        return UNKNOWN

    async def rest(self, slot: Slot, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A REST call to one instance: its status and JSON body; 0 when nothing answered.

        An instance that is up must answer within REQUEST_TIMEOUT, 202 or 503 (REDIS_TIMEOUT
        bounds its Redis calls): a call left hanging is counted against it."""
        server = slot.server.name if slot.server is not None else "?"
        try:
            async with self.http.request(
                method, slot.url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as answer:
                return answer.status, await answer.json(content_type=None)
        except TimeoutError:
            if server not in self.fleet.doomed:
                self.hung[server] += 1
            return 0, None
        except (aiohttp.ClientError, ValueError):
            return 0, None

    async def rest_anywhere(self, method: str, path: str, body: Any = None, ok: int = 202) -> tuple[int, Any]:
        """The same call on live instances in turn until one answers `ok` (an outage answers 503)."""
        status, answer = 0, None
        for attempt in range(20):
            slot = self.pick()
            if slot is not None:
                status, answer = await self.rest(slot, method, path, body)
                if status == ok:
                    break
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
        return status, answer

    async def fence(self, clients: Iterable[Client], user: str | None = None, timeout: float = WAIT) -> list[Client]:
        """Emit a fence marker (to `user`, else to all) and wait until each client has it; the
        clients that did not. Each instance delivers in the order it consumes, so once a client
        has it, its instance has consumed everything acknowledged before."""
        marker = f"{self.tag}-fence-{next(self._fences)}"
        path = f"/api/emit/users/{user}" if user is not None else "/api/emit/all"
        status, _ = await self.rest_anywhere("POST", path, {"event": "fence", "data": marker})
        waiting = list(clients)
        if status != 202:
            return waiting
        arrived = await asyncio.gather(*(client.wait_fence(marker, timeout) for client in waiting))
        late = [client for client, ok in zip(waiting, arrived) if not ok]
        self.notes["fences_late"] += bool(late)
        return late

    async def give_room(self, user: str, room: str) -> None:
        """The backend puts `user` in `room` (PUT), under the room's gate; live sockets of the user
        are fenced, so every event of the room after the gate opens is theirs."""
        async with self.user_lock(user), self.gates.changing(room):
            status, _ = await self.rest_anywhere("PUT", f"/api/users/{user}/rooms/{room}", ok=200)
            mine = [c for c in self.clients if c.user == user and c.session is not None and c.session.end is None]
            if status != 200:
                self.notes["backend_put_failed"] += 1
                for client in mine:
                    assert client.session is not None
                    client.session.uncertain.add(room)
                return
            self.backend_rooms.setdefault(user, set()).add(room)
            self.record_rooms.setdefault(user, set()).add(room)
            live = [c for c in mine if c.sio.connected]
            late = set(await self.fence(live, user=user)) if live else set()
            now = self.now()
            for client in mine:
                session = client.session
                assert session is not None
                if room in session.rooms:
                    continue  # in it already (a PUT again after Redis lost the record)
                if client in late:
                    session.uncertain.add(room)
                else:  # live and fenced, or away: its recovery counts the room from the op
                    session.rooms[room] = Membership(now, 0.0)


class Client:
    """One socket of the soak: a python-socketio client (a RecoveringClient when it opted in)
    and the sessions the oracle follows."""

    def __init__(self, world: World, index: int, user: str | None, recovering: bool, rooms: tuple[str, ...]) -> None:
        self.world = world
        self.index = index
        self.user = user
        self.recovering = recovering
        self.wanted = rooms  # public rooms it joins itself, again after each fresh session
        kind = RecoveringClient if recovering else socketio.AsyncClient
        # Its own HTTP session, passed in so that it is ours to close: Engine.IO's client opens a
        # new one on some reconnects and leaves the old one to the garbage collector.
        self.http = aiohttp.ClientSession()
        self.sio: Any = kind(reconnection=False, handle_sigint=False, http_session=self.http)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("*", self._on_event)
        self.session: Session | None = None
        self.previous: Session | None = None  # the session a failed recovery ended
        self.server: str | None = None  # the instance it is connected to
        self._target: str | None = None  # the instance a connect under way goes to
        self.replaying = False
        self.replayed = 0
        self.blinking = False
        self.hold = 0.0  # a blink's time away
        self.lost = asyncio.Event()
        self.busy = False  # a reconnection is under way
        self.fences: set[str] = set()
        self._changed = asyncio.Event()
        self.disconnected_at: float | None = None
        self._disconnect_fault = 0
        self.supervisor: asyncio.Task[None] | None = None

    @property
    def resumed(self) -> bool:
        """Whether the last CONNECT picked up the session it asked for."""
        return self.recovering and bool(self.sio.recovered)

    def name(self) -> str:
        return f"client {self.index} ({self.user or 'anonymous'}{', recovering' if self.recovering else ''})"

    # --- what the socket hears (no awaits: handlers run in arrival order) ------------------------------

    async def _on_connect(self) -> None:
        world, now = self.world, self.world.now()
        self.server = self._target
        session = self.session
        if session is not None:
            world.reconnects[(world.fault, "resumed" if self.resumed else "fresh")] += 1
        if self.resumed and session is not None and session.end is None:
            session.resumes += 1
            self.replaying, self.replayed = True, 0
            return
        if session is not None and session.end is None:  # its recovery failed: the old session is over
            self._end(session, self.disconnected_at or now, "recovery_failed:?")
            self.previous = session
        rooms = {room: Membership(now, SLACK) for room in world.record_rooms.get(self.user or "", ())}
        self.session = Session(len(world.sessions), self.index, self.user, self.recovering, now, world.fault, rooms)
        world.sessions.append(self.session)
        self.replaying = False

    def _end(self, session: Session, at: float, reason: str) -> None:
        session.end, session.end_reason, session.end_fault = at, reason, self._disconnect_fault

    async def _on_disconnect(self, reason: Any = None) -> None:
        world = self.world
        self.disconnected_at = world.now()
        self._disconnect_fault = world.fault
        if self.blinking:
            cause = "blink"
        elif self.server in world.fleet.doomed:
            cause = "instance_died"
        elif world.stopping:
            cause = "closing"
        else:
            cause = "unexpected"
            world.fail(f"{self.name()} on {self.server} was disconnected by nothing the soak did ({reason})")
        if not self.recovering and self.session is not None and self.session.end is None:
            self._end(self.session, self.disconnected_at, cause)
        self.replaying = False
        if not world.stopping:
            self.lost.set()

    async def _on_event(self, event: str, *args: Any) -> None:
        world, now = self.world, self.world.now()
        session = self.session
        if self.replaying:
            self.replayed += 1
        if event == "m":
            if not args and self.recovering:
                # RecoveringClient takes a last string argument for the offset: the server sent
                # this event without one, so its data became the socket's position.
                when = "while it disconnected" if not self.sio.connected else "while connected"
                world.fail(f"{self.name()} on {self.server}: an event without its offset {when}, "
                           f"{now - (self.disconnected_at or now):.3f}s after its last disconnect; the client "
                           f"now holds {self.sio.offset!r} as its offset")
                return
            if len(args) != 1:
                world.fail(f"{self.name()} on {self.server}: an event with {len(args)} arguments")
            emit_id = world.emit_id(args[0] if args else None)
            if session is not None:
                lag = now - world.emits[emit_id].t_req if emit_id != UNKNOWN else 0.0
                session.receive(emit_id, lag, self.replaying)
        elif event == "fence":
            self.fences.add(str(args[0]) if args else "")
            self._changed.set()
        elif event == "recovered":
            self.replaying = False
            missed = args[0].get("missed") if args and isinstance(args[0], dict) else None
            if session is not None and isinstance(missed, int):
                session.missed_reported += missed
                if missed != self.replayed - 1:
                    world.notes["recovered_missed_differs_from_replayed"] += 1
        elif event == "recovery_failed":
            reason = str(args[0].get("reason")) if args and isinstance(args[0], dict) else "?"
            world.recovery_failed[(world.fault, reason)] += 1
            if self.previous is not None and self.previous.end_reason == "recovery_failed:?":
                self.previous.end_reason = f"recovery_failed:{reason}"
            if reason in ("unknown_session", "invalid_offset"):
                world.fail(f"{self.name()}: recovery_failed {reason}, for a session the soak kept intact")
        elif event == "disconnect_reason":
            world.fail(f"{self.name()} on {self.server}: disconnect_reason {args[0] if args else None}")
        elif event == "error":
            code = args[0].get("code") if args and isinstance(args[0], dict) else None
            world.notes[f"error_event:{code}"] += 1
        else:
            world.notes[f"event:{event}"] += 1  # server_shutdown, presence: expected, counted

    async def wait_fence(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while marker not in self.fences:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return True

    # --- connecting, and coming back ------------------------------------------------------------------

    async def connect_to(self, slot: Slot) -> bool:
        assert slot.server is not None
        self._target = slot.server.name
        auth = {"token": self.world.tokens[self.user]} if self.user is not None else None
        try:
            await self.sio.connect(slot.url, auth=auth, transports=["websocket"], wait_timeout=WAIT)
        except (socketio.exceptions.ConnectionError, OSError, TimeoutError):
            return False
        return True

    async def first_connect(self, slot: Slot) -> None:
        for attempt in range(3):  # a loaded machine can miss one handshake's bound
            if await self.connect_to(slot):
                break
            await asyncio.sleep(0.5 * (attempt + 1))
        else:
            raise RuntimeError(f"{self.name()} could not connect to {slot.url}")
        self.supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.index}")

    async def _supervise(self) -> None:
        """Reconnect whenever the socket is lost: recovering ones resume, others start afresh."""
        while not self.world.stopping:
            await self.lost.wait()
            self.lost.clear()
            self.busy = True
            try:
                if self.hold:
                    await asyncio.sleep(self.hold)
                    self.hold = 0.0
                await self._reconnect()
            finally:
                self.busy = self.blinking = False

    async def _reconnect(self) -> None:
        """To a random live instance, retried with backoff; a fresh session then rejoins its rooms."""
        world = self.world
        async with world.user_lock(self.user):
            deadline, delay, reported = world.now() + RECONNECT_BOUND, 0.1, False
            while True:
                if world.stopping:
                    return
                slot = world.pick()
                if slot is not None and await self.connect_to(slot):
                    break
                if world.now() > deadline and not reported:
                    world.fail(f"{self.name()} could not reconnect within {RECONNECT_BOUND:.0f}s")
                    reported = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            if self.resumed:
                return  # resumed: back in its rooms by the server's doing, which the oracle checks
            assert self.session is not None
            await self._check_backend_rooms(self.session)
        for room in self.wanted:
            await self.join(room)

    async def _check_backend_rooms(self, session: Session) -> None:
        """A fresh session holds its user's backend rooms from the handshake: ask (`who`) which."""
        if self.user is None:
            return
        for room in BACKEND_ROOMS:
            try:
                ack = await self.sio.call("who", {"room": room}, timeout=WAIT)
            except (TimeoutError, socketio.exceptions.SocketIOError):
                ack = None
            member = isinstance(ack, dict) and ack.get("ok") is True
            refused = isinstance(ack, dict) and ack.get("error") == "forbidden"
            expected = room in session.rooms
            if not member and not refused:
                session.uncertain.add(room)  # no answer (a fault under way): both are possible
            elif member and not expected:
                self.world.notes["backend_room_unexpected_on_connect"] += 1
                session.rooms[room] = Membership(session.start, SLACK)
            elif expected and not member:
                self.world.fail(f"{self.name()}: a fresh session on {self.server} is not in {room}, "
                                f"which its user's record in Redis holds")
                del session.rooms[room]

    async def join(self, room: str, fence: bool = True) -> None:
        """Join a public room itself, under the room's gate, after a fence on this socket (so its
        instance has consumed every earlier event of the room): events after the gate are its."""
        world = self.world
        async with world.user_lock(self.user), world.gates.changing(room):
            session = self.session
            if session is None or not self.sio.connected or room in session.rooms:
                return
            late = await world.fence([self], user=self.user) if fence else []
            try:
                ack = await self.sio.call("join", {"room": room}, timeout=WAIT)
            except (TimeoutError, socketio.exceptions.SocketIOError):
                ack = None
            if self.session is not session:
                return  # a new session started meanwhile: it joins on its own
            if ack == {"ok": True, "room": room} and not late:
                session.rooms[room] = Membership(world.now(), 0.0)
            elif ack is None or late:
                session.uncertain.add(room)
            else:
                world.notes[f"join_refused:{ack}"] += 1

    async def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.cancel()
            await asyncio.gather(self.supervisor, return_exceptions=True)
        with contextlib.suppress(Exception):  # closing, whatever state a fault left it in
            if self.sio.connected:
                await self.sio.disconnect()
            await self.sio.shutdown()
        await self.http.close()


class Emitter:
    """Emits to every scope at a steady rate through REST on random live instances; each event a unique marker."""

    WEIGHTS: ClassVar[dict[str, int]] = {"all": 2, "authenticated": 2, "user": 4, "room": 3}
    IN_FLIGHT = 32  # requests at once; beyond, a tick is skipped (an outage makes each one wait)

    def __init__(self, world: World, rate: float, users: list[str]) -> None:
        self.world = world
        self.rate = rate
        self.users = users
        self.rng = random.Random(world.rng.random())
        self.skipped = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def choose(self) -> tuple[str, str | None]:
        scope = self.rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
        if scope == "user":
            return scope, self.rng.choice(self.users)
        if scope == "room":
            return scope, self.rng.choice(ROOMS)
        return scope, None

    async def run(self, stop: asyncio.Event) -> None:
        interval, due = 1.0 / self.rate, time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
                break
            except TimeoutError:
                pass
            due = max(due + interval, time.monotonic() - 1.0)  # after a stall, no catch-up burst
            if len(self._tasks) >= self.IN_FLIGHT:
                self.skipped += 1
                continue
            task = asyncio.create_task(self.send(*self.choose()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*self._tasks)

    async def send(self, scope: str, target: str | None) -> None:
        world = self.world
        async with world.gates.emitting([target] if scope == "room" and target else []):
            slot = world.pick()
            if slot is None:
                return
            emit = Emit(len(world.emits), scope, target, world.now(), world.fault)
            world.emits.append(emit)
            path = {"all": "/api/emit/all", "authenticated": "/api/emit/authenticated",
                    "user": f"/api/emit/users/{target}", "room": f"/api/emit/rooms/{target}"}[scope]
            emit.status, _ = await world.rest(slot, "POST", path, {"event": "m", "data": world.marker(emit.id)})
            emit.t_done = world.now()

    async def batch(self, size: int) -> int:
        """One POST /api/emit/batch of `size` mixed events; how many were acknowledged."""
        world = self.world
        chosen = [self.choose() for _ in range(size)]
        rooms = {target for scope, target in chosen if scope == "room" and target}
        async with world.gates.emitting(rooms):
            slot = world.pick()
            if slot is None:
                return 0
            t_req = world.now()
            emits = [Emit(len(world.emits) + i, scope, target, t_req, world.fault) for i, (scope, target) in enumerate(chosen)]
            world.emits.extend(emits)
            events = []
            for emit in emits:
                item: dict[str, Any] = {"scope": emit.scope, "event": "m", "data": world.marker(emit.id)}
                if emit.scope == "user":
                    item["user_id"] = emit.target
                elif emit.scope == "room":
                    item["room"] = emit.target
                events.append(item)
            status, _ = await world.rest(slot, "POST", "/api/emit/batch", {"events": events})
            done = world.now()
            for emit in emits:
                emit.status, emit.t_done = status, done
        return size if status == 202 else 0

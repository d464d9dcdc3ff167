"""Connection state recovery (Socket.IO v4's protocol) on top of the bus's history.

A socket that opts in (handshake auth `recover: true`) gets a private session id, `pid`, in
its CONNECT reply, and every event it receives carries the socket's position as a last argument:
the event's offset on one Redis node; on a cluster, one offset per partition its events came
from (`3:<ms>-<seq>,7:<ms>-<seq>`), since each partition numbers its own history. When it
reconnects, to any instance, it sends `{pid, offset}`; the instance reads the histories after
that position and sends what the socket was addressed by, before anything live.

The pid is signed, not stored: it names the user (a stolen pid is useless to anyone else),
the sid its gateway answers are tagged with, where the session started and which Redis data
set (epoch) its offsets belong to. So a session survives the instance that held it being
SIGKILLed. What an instance learns when a socket leaves (when, and what it had been sent) is
kept as long as the history (REPLAY_MAX_AGE); it enforces the window and lets an idle socket whose last
event is older than the history recover anyway.

The rooms a session's socket is in are written whenever they change, each with the offset its
membership began at (kept for a day after the last change), so a resumed socket gets them back
even from a SIGKILLed instance, and is replayed a room only from when it joined. Rooms the
backend gave its user are stored per user and come back with any new socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from itsdangerous import BadSignature

from ..auth.tokens import signed_serializer
from . import envelope, scopes
from .bus import Bus, BusUnavailable, Entry, History, Offset, Position

log = logging.getLogger(__name__)

_SALT = "webapp.recovery-session.v1"
ROOMS_TTL = 24 * 3600.0  # how long a session's rooms are kept after they last changed

# Puts a resuming socket back in its rooms; returns the channels its history is read from.
Rejoin = Callable[[Iterable[str]], Awaitable[list[str]]]


class Request(NamedTuple):
    """What a handshake asks for: a new recoverable session, or to resume `pid` after `offset`."""

    pid: str | None
    offset: str | None


def requested(auth: Any) -> Request | None:
    """The recovery a handshake's auth asks for, or None when the client did not opt in."""
    if not isinstance(auth, dict):
        return None
    pid, offset = auth.get("pid"), auth.get("offset")
    if isinstance(pid, str) and pid:
        return Request(pid[:2048], offset[:1024] if isinstance(offset, str) else None)
    if auth.get("recover") is True:
        return Request(None, None)
    return None


@dataclass(eq=False)
class Session:
    """A recoverable socket on this instance."""

    pid: str
    origin: str  # the sid its gateway answers carry on the bus: the session's first sid
    start: Position  # where the session began, in every partition
    sent: Position  # what the socket holds: per partition of its channels, the last offset sent
    floor: Position  # live messages at or below it were read already, or predate the socket
    replay_entries: list[Entry] = field(default_factory=list)  # the history read after its position
    replay: list[tuple[Entry, Any]] = field(default_factory=list)  # what it is sent right after CONNECT
    failure: str | None = None  # why a requested recovery failed, sent after CONNECT
    resumed: bool = False  # a session picked up again, not a new one
    # The rooms the socket is in, each with the offset (in its channel's partition) it joined
    # at; None: not known (a record written before offsets were kept), from the session's start.
    rooms: dict[str, Offset | None] = field(default_factory=dict)
    rooms_version: int = 0  # changes to `rooms` so far
    rooms_written: int = 0  # the version the last completed write held
    rooms_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time


class RecoveryFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Recovery:
    """Opens sessions, resumes them from the history, and remembers how they ended."""

    def __init__(
        self,
        bus: Bus,
        secret_keys: str | Sequence[str],
        prefix: str,
        window: float,
        history_age: float,
        *,
        concurrency: int = 16,
        wait: float = 2.0,
    ) -> None:
        """At most `concurrency` resumes read the history at once; one more waits up to `wait`
        seconds for its turn, then fails with `busy` (each is a range read over a partition)."""
        self._bus = bus
        self._turns = asyncio.Semaphore(concurrency)
        self._wait = wait
        # How a session ended is kept as long as the history it refers to, so "too late" is
        # told apart from "never said" (a SIGKILLed instance) for all that time.
        self._record_ttl = max(window, history_age)
        self._signer = signed_serializer(secret_keys, _SALT)
        self._prefix = prefix
        self.window = window
        self.recovered = 0
        self.failed: dict[str, int] = {}

    async def open(
        self, sid: str, user_id: str | None, request: Request, rejoin: Rejoin, channels: list[str]
    ) -> Session:
        """A session for a socket that opted in: resumed when its pid allows, else a new one
        for a socket on `channels`.

        Resuming calls `rejoin` with the rooms the session had joined, before the history is read.
        """
        failure = None
        if request.pid is not None:
            try:
                session = await self._resume(user_id, rejoin, request.pid, request.offset)
            except RecoveryFailed as exc:
                failure = exc.reason
                self.failed[failure] = self.failed.get(failure, 0) + 1
            else:
                self.recovered += 1
                return session
        session = await self._start(sid, user_id, channels)
        session.failure = failure
        return session

    async def _start(self, sid: str, user_id: str | None, channels: list[str]) -> Session:
        try:
            start = await self._bus.end()
        except BusUnavailable:
            # The outage mode: accepted anyway, as of Redis's clock as last measured (as its
            # memberships are): what was sent before it connected is not its to be replayed.
            # The instance's own catch-up after Redis comes back starts at its position, so
            # nothing after the session's start can be missed.
            consumed = self._bus.position or Position()
            clock = Offset(self._bus.clock_ms(), 0)
            start = Position({p: max(consumed.at(p), clock) for p in range(self._bus.partitions)})
        pid = self._signer.dumps({"u": user_id, "s": sid, "o": str(start), "e": self._bus.epoch})
        return Session(pid=pid, origin=sid, start=start, sent=start.only(self._partitions(channels)), floor=start)

    def _partitions(self, channels: list[str]) -> set[int]:
        return {self._bus.partition_of(channel) for channel in channels}

    async def _resume(self, user_id: str | None, rejoin: Rejoin, pid: str, sent: str | None) -> Session:
        try:
            claims = self._signer.loads(pid)
        except BadSignature:
            raise RecoveryFailed("unknown_session") from None
        if not isinstance(claims, dict) or claims.get("u") != user_id or not isinstance(claims.get("s"), str):
            raise RecoveryFailed("unknown_session")  # forged, or another user's
        partitions = self._bus.partitions
        start = Position.parse(claims.get("o"), partitions)
        # No offset: the socket was sent nothing after its start.
        held = Position() if sent is None else Position.parse(sent, partitions)
        if start is None or held is None or any(held.at(p) < start.at(p) for p in held.partitions()):
            raise RecoveryFailed("invalid_offset")
        if claims.get("e") != self._bus.epoch:
            raise RecoveryFailed("history_lost")  # Redis lost its data since the session began
        try:
            await asyncio.wait_for(self._turns.acquire(), self._wait)
        except TimeoutError:
            raise RecoveryFailed("busy") from None
        try:
            return await self._read(claims, pid, user_id, rejoin, start, held, sent is not None)
        finally:
            self._turns.release()

    async def _read(
        self, claims: dict[str, Any], pid: str, user_id: str | None, rejoin: Rejoin, start: Position,
        held: Position, offset_sent: bool,
    ) -> Session:
        """Read what a resumed session missed (its turn taken)."""
        try:
            since = start.merged(held)
            ended = await self._ended(pid)
            if ended is not None:
                left_at, last_sent, position = ended
                if time.time() - left_at > self.window:
                    raise RecoveryFailed("expired")
                if (held if offset_sent else start.only(last_sent.partitions())) == last_sent:
                    # It received all it was sent, and it had been sent all it was addressed by
                    # up to `position`: an idle socket's old offset need not be in the history.
                    since = since.merged(position)
            rooms = await self._rooms(pid)
            channels = await rejoin(rooms)
            history = await self._bus.history(since, channels)
            extra = self._rooms_given_meanwhile(history.entries, user_id, channels)
            if extra:  # given and taken back while away: what was sent in between is its too
                more = await self._bus.history(since, extra)
                history = History(
                    sorted([*history.entries, *more.entries], key=lambda entry: entry.mark.offset),
                    history.end.merged(more.end), history.complete and more.complete,
                )
        except BusUnavailable:
            raise RecoveryFailed("bus_unavailable") from None
        if not history.complete:
            raise RecoveryFailed("expired")  # the history no longer holds all it missed
        shown = set(held.partitions()) | self._partitions(channels)
        return Session(
            # What it holds until the replay moves it: where the history was read from.
            pid=pid, origin=claims["s"], start=start, sent=since.only(shown), floor=history.end,
            replay_entries=history.entries, resumed=True, rooms=dict(rooms),
        )

    def _rooms_given_meanwhile(self, entries: list[Entry], user_id: str | None, channels: list[str]) -> list[str]:
        """The channels of rooms a join op in the history gave the user that were not read."""
        if user_id is None:
            return []
        home = scopes.channel(self._prefix, "user", user_id=user_id)
        found: list[str] = []
        for entry in entries:
            if entry.channel != home or b'"op":"join"' not in entry.message:
                continue
            try:
                env = envelope.parse(entry.message)
            except envelope.BadEnvelope:
                continue
            channel = scopes.channel(self._prefix, "room", room=env.room)
            if env.op == "join" and channel not in channels and channel not in found:
                found.append(channel)
        return found

    async def ended(self, session: Session, position: Position | None) -> None:
        """Remember, for the window, when a session's socket left and what it had been sent."""
        value = orjson.dumps(
            {"at": time.time(), "last": str(session.sent), "pos": str((position or Position()).merged(session.sent))}
        )
        try:
            await self._bus.remember(self._key(session.pid), value, self._record_ttl)
        except BusUnavailable as exc:
            log.warning("could not record the end of a recoverable session: %s", exc)

    async def _ended(self, pid: str) -> tuple[float, Position, Position] | None:
        raw = await self._bus.recall(self._key(pid))
        if raw is None:
            return None  # still connected somewhere, or its instance died before it could say
        partitions = self._bus.partitions
        try:
            record = orjson.loads(raw)
            last = Position.parse(record["last"], partitions) if record["last"] else Position()
            position = Position.parse(record["pos"], partitions) if record["pos"] else Position()
            left_at = float(record["at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        if last is None or position is None:
            return None
        return left_at, last, position

    async def keep_rooms(self, session: Session) -> None:
        """Write the rooms a session's socket is in and when each began, for when it resumes."""
        rooms = {room: None if at is None else str(at) for room, at in sorted(session.rooms.items())}
        try:
            await self._bus.remember(self._key(session.pid) + ":rooms", orjson.dumps(rooms), ROOMS_TTL)
        except BusUnavailable as exc:
            log.warning("could not record the rooms of a recoverable session: %s", exc)

    async def _rooms(self, pid: str) -> Mapping[str, Offset | None]:
        """The rooms a session was in: `{room: offset}` (a list of names from before offsets were kept)."""
        raw = await self._bus.recall(self._key(pid) + ":rooms")
        try:
            rooms = orjson.loads(raw) if raw is not None else {}
        except orjson.JSONDecodeError:
            return {}
        if isinstance(rooms, list):
            return {room: None for room in rooms if isinstance(room, str)}
        if not isinstance(rooms, dict):
            return {}
        return {room: Offset.parse(at) for room, at in rooms.items() if isinstance(room, str)}

    def _key(self, pid: str) -> str:
        return f"{self._prefix}:recovery:{hashlib.sha256(pid.encode()).hexdigest()[:32]}"

    def status(self) -> dict[str, Any]:
        return {"window": self.window, "recovered": self.recovered, "failed": dict(self.failed)}

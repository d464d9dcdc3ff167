"""Who was a member of which channel from which offset: the one question live delivery, an
instance's catch-up after a gap and a client's recovery all ask of an event.

A socket joins a channel at an offset of that channel's partition: the instance's consumed
position there (everything after it reaches the socket, in order), or, for a channel this
instance only now subscribed, the partition's end once Redis confirmed the subscription
(what came before never reached us). While Redis is away neither is known, and the join is
dated by Redis's clock as the bus last measured it: a socket accepted during an outage is
caught up only from its own connect. An event is the socket's if it lies after that offset.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .bus import Bus, BusUnavailable, Entry, Mark, Offset, Position
from .bus.base import ZERO
from .envelope import BadEnvelope, Envelope, parse


class Membership:
    """The offsets from which each local socket is a member of its channels."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._base: dict[str, Position] = {}  # sid -> where it joined all/authenticated/its user
        self._rooms: dict[str, dict[str, Offset]] = {}  # sid -> room channel -> offset joined at
        # Per partition, the latest offset any membership here starts at: an event after it is
        # every recipient's, and no socket is looked up (the common case, live delivery).
        self._newest: dict[int, Offset] = {}

    async def now(self, channel: str, *, fresh: bool) -> Offset:
        """The offset a join of `channel` takes effect at; `fresh` when this instance has only
        just subscribed it."""
        bus = self._bus
        partition = bus.partition_of(channel)
        consumed = (bus.position or Position()).at(partition)
        if not bus.ready:
            return max(consumed, Offset(bus.clock_ms(), 0))
        if not fresh:
            return consumed
        try:
            return max(consumed, (await bus.end([partition])).at(partition))
        except BusUnavailable:
            return max(consumed, Offset(bus.clock_ms(), 0))

    def connected(self, sid: str, channels: Iterable[str]) -> None:
        """A new socket joins its base channels (held already: no round trip). While the bus is
        live that is at the consumed position, which every event still to come lies after, so
        nothing is kept; while Redis is away, at Redis's clock, which is."""
        bus = self._bus
        if bus.ready:
            return
        consumed = bus.position or Position()
        clock = Offset(bus.clock_ms(), 0)
        start = Position({p: max(consumed.at(p), clock) for p in {bus.partition_of(c) for c in channels}})
        self._base[sid] = start
        for partition in start.partitions():
            self._raise(partition, start.at(partition))

    def joined(self, sid: str, channel: str, at: Offset) -> None:
        self._rooms.setdefault(sid, {})[channel] = at
        self._raise(self._bus.partition_of(channel), at)

    def left(self, sid: str, channel: str) -> None:
        rooms = self._rooms.get(sid)
        if rooms is not None:
            rooms.pop(channel, None)

    def forget(self, sid: str) -> None:
        self._base.pop(sid, None)
        self._rooms.pop(sid, None)

    def since(self, sid: str, channel: str) -> Offset | None:
        """The offset a local socket joined a room channel at, if it is in it."""
        return self._rooms.get(sid, {}).get(channel)

    def _raise(self, partition: int, at: Offset) -> None:
        if at > self._newest.get(partition, ZERO):
            self._newest[partition] = at

    def entitled(self, sids: list[str], channel: str, mark: Mark | None) -> list[str]:
        """The sockets among `sids` that were members of `channel` at the event at `mark`."""
        if mark is None or mark.offset > self._newest.get(mark.partition, ZERO):
            return sids
        return [sid for sid in sids if mark.offset > self._joined_at(sid, channel, mark.partition)]

    def _joined_at(self, sid: str, channel: str, partition: int) -> Offset:
        at = self._rooms.get(sid, {}).get(channel)
        if at is not None:
            return at
        base = self._base.get(sid)
        return base.at(partition) if base is not None else ZERO


class RecentIds:
    """Envelope ids for as long as the history holds their entries (at most `size` per
    partition and `max_age` seconds): a message Redis applied twice (a retried publish whose
    first reply was lost) is dropped while its first copy could still be told apart."""

    def __init__(self, size: int, max_age: float) -> None:
        self._size = max(1, size)
        self._max_age_ms = int(max_age * 1000)
        self._ids: set[str] = set()
        self._order: dict[int, deque[tuple[int, str]]] = {}  # partition -> (ms, id), oldest first

    def seen(self, envelope_id: str, mark: Mark | None) -> bool:
        """True if `envelope_id` was seen; else remember it."""
        if envelope_id in self._ids:
            return True
        self._ids.add(envelope_id)
        partition, ms = (mark.partition, mark.offset.ms) if mark is not None else (-1, int(time.time() * 1000))
        order = self._order.setdefault(partition, deque())
        order.append((ms, envelope_id))
        while len(order) > self._size or (order and order[0][0] < ms - self._max_age_ms):
            self._ids.discard(order.popleft()[1])
        return False

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class ReplayPlan:
    """What a resumed session is sent, and how its rooms stand after the history's ops."""

    entries: list[tuple[Entry, Envelope]] = field(default_factory=list)
    rooms: set[str] = field(default_factory=set)  # rooms it is in once the replay is through
    ended: set[str] = field(default_factory=set)  # rooms an op in the history took it out of
    duplicates: int = 0


def plan_replay(
    history: list[Entry],
    *,
    home: Callable[[str, Envelope], bool],
    room_channel: Callable[[str], str],
    user_id: str | None,
    origin: str,
    kept: Mapping[str, Offset | None],
    given: Iterable[str],
) -> ReplayPlan:
    """Walk a resumed session's history in order and keep what it was entitled to.

    `kept`: the rooms the session was in when it left, each with the offset it joined at (None:
    unknown, from its start). `given`: the rooms the backend gives its user now; one of them
    not in `kept` was given while the socket was away, and counts from the op that gave it.
    Ops for its user (join, leave) and a room's close change membership where they stand; a
    message that is not a valid envelope on its scope's channel (`home`), another socket's
    target, its own gateway answer, or an envelope id seen before in the walk is skipped.
    """
    plan = ReplayPlan()
    member: dict[str, Offset | None] = dict(kept)  # room -> joined at (None: from the start)
    pending = set(given) - set(kept)  # given while away: a member from the op that gave it
    seen: set[str] = set()
    for entry in history:
        try:
            env = parse(entry.message)
        except BadEnvelope:
            continue
        if not home(entry.channel, env):
            continue
        if env.op != "emit":
            _apply_op(env, user_id, member, pending, plan)
            continue
        if env.scope == "sid" or (env.scope == "user" and env.user_id != user_id):
            continue
        if env.scope == "authenticated" and user_id is None:
            continue
        if env.scope == "room":
            room = env.room or ""
            if room not in member:
                continue
            joined = member[room]
            if joined is not None and entry.mark.offset <= joined and entry.channel == room_channel(room):
                continue  # sent before this socket joined the room
        if env.origin.sid == origin or origin in env.skip:
            continue  # its own answer: the socket had it directly
        if env.id in seen:
            plan.duplicates += 1
            continue
        seen.add(env.id)
        plan.entries.append((entry, env))
    # Rooms its user has now are its from here on, whatever the history said of them (a closed
    # room the backend still gives comes back with any new socket, a resumed one included).
    plan.rooms = set(member) | pending | set(given)
    plan.ended -= set(given)
    return plan


def _apply_op(
    env: Envelope, user_id: str | None, member: dict[str, Offset | None], pending: set[str], plan: ReplayPlan
) -> None:
    room = env.room
    if room is None:
        return
    if env.op == "close" and env.scope == "room":
        _end(room, member, pending, plan)
    elif env.scope == "user" and user_id is not None and env.user_id == user_id:
        if env.op == "leave":
            _end(room, member, pending, plan)
        elif env.op == "join" and room not in member:
            member[room] = None  # from here on: the walk is in order
            pending.discard(room)
            plan.ended.discard(room)


def _end(room: str, member: dict[str, Offset | None], pending: set[str], plan: ReplayPlan) -> None:
    if room in member or room in pending:
        member.pop(room, None)
        pending.discard(room)
        plan.ended.add(room)

"""The chaos soak's oracle: which acknowledged events each socket session was owed, judged against what it got."""

from __future__ import annotations

import bisect
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

# A fresh session joins its channels at its instance's consumed position, which may lag what
# Redis already acknowledged (after a catch-up, more so): events acknowledged up to this long
# before the session started may still reach it, once. Older ones would be a misdelivery.
SLACK = 30.0
REQUEST_BOUND = 15.0  # no REST call of the soak takes longer (its client timeout is shorter)


class Owed(Enum):
    REQUIRED = "required"  # must arrive exactly once
    START = "start"  # acknowledged around the session's (or membership's) start: may arrive, once
    END = "end"  # owed, but acknowledged after the last sign of life of a session that ended: may arrive, once
    REFUSED = "refused"  # answered 503 or not at all, yet maybe applied (documented): may arrive, once
    UNCERTAIN = "uncertain"  # a room membership the soak could not pin down: may arrive, once
    NO = "no"  # must never arrive


@dataclass(eq=False)
class Emit:
    """One event the soak sent through REST, with the times its request left and its answer came."""

    id: int
    scope: str
    target: str | None  # the user of a `user` emit, the room of a `room` emit
    t_req: float
    fault: int  # the fault window it was sent in (0: before the first fault)
    t_done: float = 0.0
    status: int = 0  # HTTP status; 0: no answer (connection refused or reset, timeout)

    @property
    def acked(self) -> bool:
        return self.status == 202


@dataclass
class Membership:
    """A session's membership of a room: from `since`; events acknowledged up to `slack` seconds
    before it may arrive too (a membership dated by a handshake), none when it was joined under
    the room's gate after a fence."""

    since: float
    slack: float


@dataclass(eq=False)
class Session:
    """One Socket.IO session of a client: from a fresh CONNECT to the disconnect it did not
    recover from (a successful recovery continues it)."""

    id: int
    client: int
    user: str | None
    recovering: bool
    start: float
    fault: int  # the fault window it started in
    rooms: dict[str, Membership] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)  # rooms whose membership could not be pinned down
    end: float | None = None
    end_fault: int = 0
    end_reason: str = ""  # "recovery_failed:<reason>", "instance_died", "unexpected"
    received: array[int] = field(default_factory=lambda: array("I"))  # emit ids, in arrival order
    lags: array[float] = field(default_factory=lambda: array("f"))  # seconds since each emit's request
    replayed: array[int] = field(default_factory=lambda: array("b"))  # 1: arrived in a recovery's replay
    resumes: int = 0  # successful recoveries
    missed_reported: int = 0  # the sum of `recovered` {"missed"} it was told

    def receive(self, emit_id: int, lag: float, replaying: bool) -> None:
        self.received.append(emit_id)
        self.lags.append(lag)
        self.replayed.append(1 if replaying else 0)


def owed(session: Session, emit: Emit, cutoff: float) -> Owed:
    """What `session` was owed of `emit`, by the scope's rules and the session's edges.

    `cutoff`, for an ended session: the request time of the latest-requested event it got. An
    event acknowledged before that request has a smaller offset, and each instance delivers in
    offset order, so it had to arrive first; later ones may have died with the connection.
    """
    since, slack = session.start, SLACK
    if emit.scope == "authenticated" and session.user is None:
        return Owed.NO
    if emit.scope == "user" and session.user != emit.target:
        return Owed.NO
    if emit.scope == "room":
        assert emit.target is not None
        if emit.target in session.uncertain:
            return Owed.UNCERTAIN
        membership = session.rooms.get(emit.target)
        if membership is None:
            return Owed.NO
        since, slack = membership.since, membership.slack
    done = emit.t_done or emit.t_req
    if emit.t_req < since:
        return Owed.START if done >= since - slack else Owed.NO
    if session.end is not None:
        if emit.t_req > session.end:
            return Owed.NO
        if done >= cutoff:
            return Owed.END
    return Owed.REQUIRED if emit.acked else Owed.REFUSED


def cutoff_of(session: Session, emits: list[Emit]) -> float:
    """The request time of the latest-requested event an ended session got (its start if none)."""
    return max((emits[i].t_req for i in session.received if i < len(emits)), default=session.start)


@dataclass
class Judgement:
    """Everything the oracle counted; `failures` lists what breaks the contract."""

    checked: int = 0  # (session, event) pairs judged
    delivered: int = 0
    required: int = 0
    missing: int = 0
    duplicated: int = 0
    misdelivered: int = 0
    unknown: int = 0  # arrivals naming no emit of this run
    refused_but_delivered: int = 0  # a 503 hid an event Redis applied (documented): at most once
    excused: Counter[int] = field(default_factory=Counter)  # per fault: owed events a failed recovery excused
    lost_plain: Counter[int] = field(default_factory=Counter)  # per fault: events sockets not opted in missed
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < 25:
            self.examples.append(text)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.misdelivered or self.unknown)


class Index:
    """Emits by scope key, each list in request order, for a session's window."""

    def __init__(self, emits: list[Emit]) -> None:
        self.emits = emits
        self._lists: dict[tuple[str, str | None], list[Emit]] = {}
        for emit in emits:
            key = (emit.scope, emit.target if emit.scope in ("user", "room") else None)
            self._lists.setdefault(key, []).append(emit)
        self._times = {key: [e.t_req for e in values] for key, values in self._lists.items()}

    def window(self, key: tuple[str, str | None], start: float, end: float | None) -> Iterator[Emit]:
        emits, times = self._lists.get(key, []), self._times.get(key, [])
        lo = bisect.bisect_left(times, start)
        hi = len(times) if end is None else bisect.bisect_right(times, end)
        return iter(emits[lo:hi])


def keys_of(session: Session) -> Iterable[tuple[str, str | None]]:
    yield ("all", None)
    if session.user is not None:
        yield ("authenticated", None)
        yield ("user", session.user)
    for room in {*session.rooms, *session.uncertain}:
        yield ("room", room)


def judge(emits: list[Emit], sessions: list[Session]) -> Judgement:
    """Every session against every event it could have been owed or could have got."""
    verdict = Judgement()
    index = Index(emits)
    for session in sessions:
        cutoff = cutoff_of(session, emits) if session.end is not None else 0.0
        got = Counter(session.received)
        verdict.delivered += len(session.received)
        candidates: dict[int, Emit] = {}
        lo = session.start - SLACK - REQUEST_BOUND
        for key in keys_of(session):
            for emit in index.window(key, lo, session.end):
                candidates[emit.id] = emit
        for emit_id in got:
            if emit_id >= len(emits):
                verdict.unknown += got[emit_id]
                verdict.example(f"session {session.id}: got an event of no emit ({emit_id})")
            elif emit_id not in candidates:
                candidates[emit_id] = emits[emit_id]
        for emit in candidates.values():
            verdict.checked += 1
            count = got.get(emit.id, 0)
            kind = owed(session, emit, cutoff)
            where = f"session {session.id} (client {session.client}, user {session.user})"
            if count > 1:
                verdict.duplicated += count - 1
                verdict.example(f"{where}: {emit.scope} event {emit.id} arrived {count} times")
            if kind is Owed.NO and count:
                verdict.misdelivered += 1
                verdict.example(f"{where}: {emit.scope}:{emit.target} event {emit.id} was not its own")
            elif kind is Owed.REQUIRED:
                verdict.required += 1
                if not count:
                    verdict.missing += 1
                    verdict.example(f"{where}: {emit.scope}:{emit.target} event {emit.id} never arrived")
            elif kind is Owed.REFUSED and count:
                verdict.refused_but_delivered += 1
            elif kind is Owed.END and emit.acked and not count:  # the cost of the session's end
                if session.end_reason.startswith("recovery_failed"):
                    verdict.excused[session.end_fault] += 1
                else:
                    verdict.lost_plain[session.end_fault] += 1
    return verdict

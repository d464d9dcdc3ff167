"""Model-based: random sequences of connects, disconnects, blinks and recoveries (on any instance),
emits to every scope and to rooms, gateway sends, room joins and leaves by sockets and by the
backend, closed rooms and SIGKILLed instances, over three instances. An oracle says what each
socket was entitled to when each event was sent; every socket gets exactly that, no more, no
fewer, no duplicates: a recovering socket once it is back, with everything it missed.

Derandomised (the same cases every run) unless MODEL_RANDOM=1, which draws new ones;
MODEL_EXAMPLES and MODEL_STEPS size a longer run.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from webapp.client import RecoveringClient

from .conftest import BACKENDS, Cluster, on_backend
from .harness import WAIT, LoopThread, Probe, api, fence, token_for, unique

pytestmark = pytest.mark.cluster

USERS = ["alice", "bob", None]  # None: an anonymous socket
INSTANCES = 3
SOCKET_ROOMS = ["public:r1", "public:r2"]  # rooms the demo policy lets a signed-in socket join
BACKEND_ROOMS = ["public:r1", "team:t1"]  # rooms the backend puts users in (PUT /api/users/<id>/rooms)
ROOMS = sorted({*SOCKET_ROOMS, *BACKEND_ROOMS})
COUNTED = ("m", "events")  # the events the oracle counts (not fences, presence or notices)


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Cluster]:
    """Three instances on one Redis node, then on a Redis Cluster: the oracle holds on both.
    tests.fleet_app serves python-socketio's own `close_room` as a socket event."""
    with on_backend(request, redis_client, "model", ("A", "B", "C"), app="tests.fleet_app:app") as started:
        yield started


class RecoveringProbe(Probe):
    """A Probe whose client opts in to recovery and resumes its session when it connects again."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.client = RecoveringClient(reconnection=False)
        self.client.on("*", self._record)
        self.client.on("connect_error", self._on_connect_error)


@dataclass(eq=False)
class Sock:
    """One socket as the oracle sees it: a stable identity across its blinks."""

    probe: Probe
    user: str | None
    recovering: bool
    rooms: set[str]
    expected: Counter[str] = field(default_factory=Counter)
    away: bool = False  # a recovering socket between a blink and its return


class Delivery(RuleBasedStateMachine):
    cluster: Cluster
    loop: LoopThread

    def __init__(self) -> None:
        super().__init__()
        self.run_id = unique("m")
        self.socks: list[Sock] = []
        self.given: dict[str, set[str]] = {"alice": set(), "bob": set()}  # rooms the backend gave
        self.tokens: dict[str, str] = {}
        self.counter = itertools.count()
        self.killed = False

    def user(self, name: str) -> str:
        return f"{self.run_id}-{name}"

    def base(self, index: int) -> str:
        return self.cluster.instances[index].url

    def connected(self) -> list[Sock]:
        return [s for s in self.socks if not s.away]

    def away(self) -> list[Sock]:
        return [s for s in self.socks if s.away]

    def expect(self, marker: str, receivers: list[Sock]) -> None:
        for sock in receivers:
            sock.expected[marker] += 1

    def marker(self) -> str:
        return f"{self.run_id}-{next(self.counter)}"

    def fence(self) -> None:
        self.loop.run(fence(self.base(0), [s.probe for s in self.connected()]))

    @initialize()
    def start(self) -> None:
        for name in ("alice", "bob"):
            self.tokens[name] = self.loop.run(token_for(self.base(0), self.user(name)))

    # --- sockets come, go, blink and come back ------------------------------------------------

    @precondition(lambda self: len(self.socks) < 6)
    @rule(user=st.sampled_from(USERS), instance=st.integers(0, INSTANCES - 1),
          recovering=st.sampled_from([True, True, False]))
    def connect(self, user: str | None, instance: int, recovering: bool) -> None:
        name = f"{user}@{instance}{'+r' if recovering else ''}"
        probe = RecoveringProbe(name) if recovering else Probe(name)
        self.loop.run(probe.connect(self.base(instance), self.tokens[user] if user else None))
        self.socks.append(Sock(probe, user, recovering, set(self.given[user]) if user else set()))

    @precondition(lambda self: self.connected())
    @rule(pick=st.integers(0, 5))
    def disconnect(self, pick: int) -> None:
        sock = self.connected()[pick % len(self.connected())]
        self.socks.remove(sock)
        self.loop.run(sock.probe.close())

    @precondition(lambda self: any(s.recovering for s in self.connected()))
    @rule(pick=st.integers(0, 5))
    def blink(self, pick: int) -> None:
        """A recovering socket loses its connection; it is entitled to what is sent meanwhile."""
        candidates = [s for s in self.connected() if s.recovering]
        sock = candidates[pick % len(candidates)]
        self.loop.run(sock.probe.client.disconnect())
        sock.away = True

    @precondition(lambda self: self.away())
    @rule(pick=st.integers(0, 5), instance=st.integers(0, INSTANCES - 1))
    def come_back(self, pick: int, instance: int) -> None:
        """It resumes its session, on any instance: in the rooms it kept, and those its user has.
        What it missed arrives before anything live (the next fence checks it all)."""
        sock = self.away()[pick % len(self.away())]
        probe = sock.probe
        self.loop.run(probe.connect(self.base(instance), self.tokens[sock.user] if sock.user else None))
        assert isinstance(probe.client, RecoveringClient) and probe.client.recovered, f"{probe.name}: not resumed"
        sock.away = False
        if sock.user is not None:
            sock.rooms |= self.given[sock.user]
        # Its rooms as the instance holds them: a room taken away must not come back.
        scopes = {probe.sid, f"user:{self.user(sock.user)}", "authenticated"} if sock.user else {probe.sid}
        held = self.loop.run(probe.client.call("api_rooms", None, timeout=WAIT))
        assert set(held) == sock.rooms | scopes, f"{probe.name}: in {held}, expected {sorted(sock.rooms)}"

    @precondition(lambda self: not self.killed and self.connected())
    @rule(instance=st.integers(0, INSTANCES - 1), chance=st.integers(0, 9))
    def sigkill(self, instance: int, chance: int) -> None:
        """An instance dies and comes back: its recovering sockets are away, the others gone.
        A restart costs seconds: one case in several has one."""
        if chance:
            return
        self.killed = True
        self.cluster.restart(instance)
        port = self.cluster.instances[instance].port
        for sock in self.connected():
            probe = sock.probe
            if probe.client.connection_url and f":{port}" in probe.client.connection_url:
                self.loop.run(probe.wait_until(lambda p=probe: not p.client.connected, "the dead transport"))
                if sock.recovering:
                    sock.away = True
                else:
                    self.socks.remove(sock)
                    self.loop.run(probe.close())

    # --- rooms ------------------------------------------------------------------------------------

    @precondition(lambda self: self.connected())
    @rule(pick=st.integers(0, 5), room=st.sampled_from(SOCKET_ROOMS), join=st.booleans())
    def socket_joins_or_leaves(self, pick: int, room: str, join: bool) -> None:
        sock = self.connected()[pick % len(self.connected())]
        ack = self.loop.run(sock.probe.client.call("join" if join else "leave", {"room": room}, timeout=WAIT))
        if join and sock.user is None:
            assert ack == {"ok": False, "error": "forbidden"}  # the demo policy: signed-in users only
            return
        assert ack == {"ok": True, "room": room}
        (sock.rooms.add if join else sock.rooms.discard)(room)

    @rule(user=st.sampled_from(["alice", "bob"]), room=st.sampled_from(BACKEND_ROOMS), join=st.booleans(),
          instance=st.integers(0, INSTANCES - 1))
    def backend_joins_or_leaves(self, user: str, room: str, join: bool, instance: int) -> None:
        path = f"/api/users/{self.user(user)}/rooms/{room}"
        status, _ = self.loop.run(api(self.base(instance), path, method="PUT" if join else "DELETE"))
        assert status == 200
        (self.given[user].add if join else self.given[user].discard)(room)
        for sock in self.socks:  # away ones too: their history's ops say so when they resume
            if sock.user == user:
                (sock.rooms.add if join else sock.rooms.discard)(room)
        # Live sockets apply it when their instance consumes the op; the fence orders it before
        # anything published after it.
        self.fence()

    @precondition(lambda self: self.connected())
    @rule(pick=st.integers(0, 5), room=st.sampled_from(ROOMS))
    def close_room(self, pick: int, room: str) -> None:
        """python-socketio's `close_room`: every socket leaves it (the backend's record stays)."""
        asker = self.connected()[pick % len(self.connected())]
        ack = self.loop.run(asker.probe.client.call("api_close", {"room": room}, timeout=WAIT))
        assert ack == {"ok": True, "result": None}
        for sock in self.socks:
            sock.rooms.discard(room)
        self.fence()

    # --- emits --------------------------------------------------------------------------------------

    @rule(to=st.sampled_from(["all", "authenticated", "user:alice", "user:bob", *ROOMS]),
          instance=st.integers(0, INSTANCES - 1))
    def emit(self, to: str, instance: int) -> None:
        """One rule for every scope, so that emits do not crowd out the socket rules."""
        if to == "all":
            path, receivers = "/api/emit/all", list(self.socks)
        elif to == "authenticated":
            path, receivers = "/api/emit/authenticated", [s for s in self.socks if s.user is not None]
        elif to.startswith("user:"):
            user = to.removeprefix("user:")
            path, receivers = f"/api/emit/users/{self.user(user)}", [s for s in self.socks if s.user == user]
        else:
            path, receivers = f"/api/emit/rooms/{to}", [s for s in self.socks if to in s.rooms]
        marker = self.marker()
        status, answer = self.loop.run(api(self.base(instance), path, {"event": "m", "data": marker}))
        assert status == 202, answer
        self.expect(marker, receivers)

    @precondition(lambda self: self.connected())
    @rule(pick=st.integers(0, 5))
    def gateway_send(self, pick: int) -> None:
        asker = self.connected()[pick % len(self.connected())]
        marker = self.marker()
        ack = self.loop.run(asker.probe.client.call("events", marker, timeout=WAIT))
        assert ack == {"ok": True, "answers": 1}
        others = [s for s in self.socks if asker.user is not None and s.user == asker.user and s is not asker]
        self.expect(marker, [asker, *others])

    # --- the oracle -----------------------------------------------------------------------------

    @invariant()
    def everyone_got_exactly_what_the_oracle_says(self) -> None:
        if not self.connected():
            return
        self.fence()
        for sock in self.connected():
            probe = sock.probe
            assert all(e["code"] == "forbidden" for e in probe.of("error")), probe.of("error")
            assert probe.of("recovery_failed") == [], f"{probe.name}: {probe.events}"
            got = Counter(data for name, data in probe.events if name in COUNTED)
            assert got == sock.expected, f"{probe.name}: got {got}, expected {sock.expected}"

    def teardown(self) -> None:
        for sock in self.socks:
            self.loop.run(sock.probe.close())


@pytest.mark.timeout(600)
def test_delivery_matches_the_oracle(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    """50 cases of 30 steps on one Redis node (about 25 s here), 20 on the cluster, where each
    step's sound fence makes every instance consume every partition (about 50 s)."""
    Delivery.cluster = cluster
    examples = "50" if request.node.callspec.params["cluster"] == "redis" else "20"
    case: type = Delivery.TestCase
    case.settings = settings(
        max_examples=int(os.environ.get("MODEL_EXAMPLES", examples)),
        stateful_step_count=int(os.environ.get("MODEL_STEPS", "30")),
        deadline=None,
        derandomize=os.environ.get("MODEL_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
    )
    with LoopThread.running() as Delivery.loop:
        case().runTest()

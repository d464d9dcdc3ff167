"""Model-based: random sequences of connects, disconnects, emits, gateway sends, room joins and
leaves (by sockets and by the backend) and room emits over three instances; every socket gets
exactly what an oracle says, no more, no fewer, no duplicates."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .conftest import BACKENDS, Cluster, on_backend
from .harness import LoopThread, Probe, api, fence, run_machine, token_for, unique

pytestmark = pytest.mark.cluster

USERS = ["alice", "bob", None]  # None: an anonymous socket
INSTANCES = 3
SOCKET_ROOMS = ["public:r1", "public:r2"]  # rooms the demo policy lets a signed-in socket join
BACKEND_ROOMS = ["public:r1", "team:t1"]  # rooms the backend puts users in (PUT /api/users/<id>/rooms)


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Cluster]:
    """Three instances on one Redis node, then on a Redis Cluster: the oracle holds on both."""
    with on_backend(request, redis_client, "model", ("A", "B", "C")) as started:
        yield started


class Delivery(RuleBasedStateMachine):
    cluster: Cluster
    loop: LoopThread

    def __init__(self) -> None:
        super().__init__()
        self.run_id = unique("m")
        self.sockets: list[tuple[Probe, str | None]] = []  # open sockets and their users
        self.rooms: dict[int, set[str]] = {}  # each open socket's rooms, by id(probe)
        self.given: dict[str, set[str]] = {"alice": set(), "bob": set()}  # rooms the backend gave
        self.expected: dict[int, Counter[str]] = {}
        self.closed: list[Probe] = []
        self.tokens: dict[str, str] = {}
        self.counter = itertools.count()

    def user(self, name: str) -> str:
        return f"{self.run_id}-{name}"

    def base(self, index: int) -> str:
        return self.cluster.instances[index].url

    def expect(self, marker: str, receivers: list[Probe]) -> None:
        for probe in receivers:
            self.expected[id(probe)][marker] += 1

    def marker(self) -> str:
        return f"{self.run_id}-{next(self.counter)}"

    @initialize()
    def start(self) -> None:
        for name in ("alice", "bob"):
            self.tokens[name] = self.loop.run(token_for(self.base(0), self.user(name)))

    @precondition(lambda self: len(self.sockets) < 6)
    @rule(user=st.sampled_from(USERS), instance=st.integers(0, INSTANCES - 1))
    def connect(self, user: str | None, instance: int) -> None:
        probe = Probe(f"{user}@{instance}")
        self.loop.run(probe.connect(self.base(instance), self.tokens[user] if user else None))
        self.sockets.append((probe, user))
        self.expected[id(probe)] = Counter()
        self.rooms[id(probe)] = set(self.given[user]) if user else set()

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 5), room=st.sampled_from(SOCKET_ROOMS), join=st.booleans())
    def socket_joins_or_leaves(self, pick: int, room: str, join: bool) -> None:
        probe, user = self.sockets[pick % len(self.sockets)]
        ack = self.loop.run(probe.client.call("join" if join else "leave", {"room": room}, timeout=10))
        if join and user is None:
            assert ack == {"ok": False, "error": "forbidden"}  # the demo policy: signed-in users only
            return
        assert ack == {"ok": True, "room": room}
        (self.rooms[id(probe)].add if join else self.rooms[id(probe)].discard)(room)

    @rule(user=st.sampled_from(["alice", "bob"]), room=st.sampled_from(BACKEND_ROOMS), join=st.booleans(),
          instance=st.integers(0, INSTANCES - 1))
    def backend_joins_or_leaves(self, user: str, room: str, join: bool, instance: int) -> None:
        path = f"/api/users/{self.user(user)}/rooms/{room}"
        status, _ = self.loop.run(api(self.base(instance), path, method="PUT" if join else "DELETE"))
        assert status == 200
        (self.given[user].add if join else self.given[user].discard)(room)
        for probe, owner in self.sockets:
            if owner == user:
                (self.rooms[id(probe)].add if join else self.rooms[id(probe)].discard)(room)
        # Live sockets apply it when their instance consumes the op; a fence orders it before
        # anything published after it (each instance consumes in publish order).
        self.loop.run(fence(self.base(instance), [p for p, _ in self.sockets]))

    @rule(room=st.sampled_from(sorted({*SOCKET_ROOMS, *BACKEND_ROOMS})), instance=st.integers(0, INSTANCES - 1))
    def emit_to_room(self, room: str, instance: int) -> None:
        marker = self.marker()
        status, _ = self.loop.run(api(self.base(instance), f"/api/emit/rooms/{room}", {"event": "m", "data": marker}))
        assert status == 202
        self.expect(marker, [p for p, _ in self.sockets if room in self.rooms[id(p)]])

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 5))
    def disconnect(self, pick: int) -> None:
        probe, _ = self.sockets.pop(pick % len(self.sockets))
        self.loop.run(probe.close())
        self.closed.append(probe)

    @rule(user=st.sampled_from(["alice", "bob"]), instance=st.integers(0, INSTANCES - 1))
    def emit_to_user(self, user: str, instance: int) -> None:
        marker = self.marker()
        status, _ = self.loop.run(api(self.base(instance), f"/api/emit/users/{self.user(user)}", {"event": "m", "data": marker}))
        assert status == 202
        self.expect(marker, [p for p, u in self.sockets if u == user])

    @rule(instance=st.integers(0, INSTANCES - 1))
    def emit_to_all(self, instance: int) -> None:
        marker = self.marker()
        assert self.loop.run(api(self.base(instance), "/api/emit/all", {"event": "m", "data": marker}))[0] == 202
        self.expect(marker, [p for p, _ in self.sockets])

    @rule(instance=st.integers(0, INSTANCES - 1))
    def emit_to_authenticated(self, instance: int) -> None:
        marker = self.marker()
        assert self.loop.run(api(self.base(instance), "/api/emit/authenticated", {"event": "m", "data": marker}))[0] == 202
        self.expect(marker, [p for p, u in self.sockets if u is not None])

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 5))
    def gateway_send(self, pick: int) -> None:
        asker, user = self.sockets[pick % len(self.sockets)]
        marker = self.marker()
        ack = self.loop.run(asker.client.call("events", marker, timeout=10))
        assert ack == {"ok": True, "answers": 1}
        others = [p for p, u in self.sockets if user is not None and u == user and p is not asker]
        self.expect(marker, [asker, *others])

    @invariant()
    def everyone_got_exactly_what_the_oracle_says(self) -> None:
        if not self.sockets:
            return
        probes = [p for p, _ in self.sockets]
        self.loop.run(fence(self.base(0), probes))
        for probe in probes:
            assert all(e["code"] == "forbidden" for e in probe.of("error")), probe.of("error")
            got = Counter(data for name, data in probe.events if name in ("m", "events"))
            assert got == self.expected[id(probe)], f"{probe.name}: got {got}, expected {self.expected[id(probe)]}"

    def teardown(self) -> None:
        for probe, _ in self.sockets:
            self.loop.run(probe.close())


def test_delivery_matches_the_oracle(cluster: Cluster) -> None:
    Delivery.cluster = cluster
    with LoopThread.running() as Delivery.loop:
        run_machine(Delivery, examples=12, steps=15)

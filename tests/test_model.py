"""Model-based: random sequences of connects, disconnects, emits and gateway sends over two
instances; every socket gets exactly what an oracle says, no more, no fewer, no duplicates."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .conftest import Cluster
from .harness import LoopThread, Probe, api, fence, token_for, unique

pytestmark = pytest.mark.cluster

USERS = ["alice", "bob", None]  # None: an anonymous socket


class Delivery(RuleBasedStateMachine):
    cluster: Cluster
    loop: LoopThread

    def __init__(self) -> None:
        super().__init__()
        self.run_id = unique("m")
        self.sockets: list[tuple[Probe, str | None]] = []  # open sockets and their users
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
    @rule(user=st.sampled_from(USERS), instance=st.integers(0, 1))
    def connect(self, user: str | None, instance: int) -> None:
        probe = Probe(f"{user}@{instance}")
        self.loop.run(probe.connect(self.base(instance), self.tokens[user] if user else None))
        self.sockets.append((probe, user))
        self.expected[id(probe)] = Counter()

    @precondition(lambda self: self.sockets)
    @rule(pick=st.integers(0, 5))
    def disconnect(self, pick: int) -> None:
        probe, _ = self.sockets.pop(pick % len(self.sockets))
        self.loop.run(probe.close())
        self.closed.append(probe)

    @rule(user=st.sampled_from(["alice", "bob"]), instance=st.integers(0, 1))
    def emit_to_user(self, user: str, instance: int) -> None:
        marker = self.marker()
        status, _ = self.loop.run(api(self.base(instance), f"/api/emit/users/{self.user(user)}", {"event": "m", "data": marker}))
        assert status == 202
        self.expect(marker, [p for p, u in self.sockets if u == user])

    @rule(instance=st.integers(0, 1))
    def emit_to_all(self, instance: int) -> None:
        marker = self.marker()
        assert self.loop.run(api(self.base(instance), "/api/emit/all", {"event": "m", "data": marker}))[0] == 202
        self.expect(marker, [p for p, _ in self.sockets])

    @rule(instance=st.integers(0, 1))
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
            got = Counter(data for name, data in probe.events if name in ("m", "events"))
            assert got == self.expected[id(probe)], f"{probe.name}: got {got}, expected {self.expected[id(probe)]}"

    def teardown(self) -> None:
        for probe, _ in self.sockets:
            self.loop.run(probe.close())


def test_delivery_matches_the_oracle(cluster: Cluster) -> None:
    loop = LoopThread()
    Delivery.cluster = cluster
    Delivery.loop = loop
    try:
        run: Any = Delivery.TestCase
        run.settings = settings(
            max_examples=12, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
        )
        run().runTest()
    finally:
        loop.close()

"""Connection state recovery on a Redis Cluster, where each partition numbers its own history: a
socket's position names an offset per partition, and a resumed socket gets what it missed on
every one of them, once, in each partition's order."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
import redis

from webapp.realtime.bus import Position
from webapp.realtime.bus.partitions import CLUSTER_PARTITIONS, Partitions

from .conftest import Cluster
from .harness import api, token_for, unique
from .test_recovery import Wire, emit

pytestmark = pytest.mark.cluster


@pytest.fixture
def fleet(redis_cluster_url: str) -> Iterator[Cluster]:
    started = Cluster(unique("crecover"), ("A", "B"), redis_url=redis_cluster_url)
    try:
        yield started
    finally:
        started.close()


def partitions(prefix: str) -> Partitions:
    return Partitions(f"{{{prefix}}}:replay", CLUSTER_PARTITIONS, sharded=True)


def position(stamp: Any) -> Position:
    parsed = Position.parse(stamp, CLUSTER_PARTITIONS)
    assert parsed is not None, stamp
    return parsed


def moves_forward(stamps: list[Any]) -> bool:
    """Each position is at or after the one before in every partition, and differs from it."""
    seen = [position(stamp) for stamp in stamps]
    return all(
        later != earlier and all(later.at(p) >= earlier.at(p) for p in earlier.partitions())
        for earlier, later in pairwise(seen)
    )


async def test_a_socket_recovers_what_it_missed_on_every_partition(fleet: Cluster, wires: list[Wire]) -> None:
    a, b = fleet.instances
    prefix = fleet.prefix
    parts = partitions(prefix)
    alice = unique("alice")
    used = {parts.of(f"{prefix}:user:{alice}"), parts.of(f"{prefix}:all"), parts.of(f"{prefix}:authenticated")}
    room = next(r for r in (f"team{n}" for n in range(100)) if parts.of(f"{prefix}:room:{r}") not in used)
    status, body = await api(a.url, f"/api/users/{alice}/rooms/{room}", method="PUT")
    assert status == 200, body
    token = await token_for(a.url, alice)
    first = await Wire.connect(a.url, {"token": token, "recover": True})
    wires.append(first)
    pid = first.reply["pid"]

    await emit(b.url, f"/api/emit/users/{alice}", "dm", 1)
    await emit(b.url, f"/api/emit/rooms/{room}", "chat", 2)
    got = [await first.event(), await first.event()]
    assert [e[:2] for e in got] == [["dm", 1], ["chat", 2]]
    assert moves_forward([e[2] for e in got])
    # Its position names the partitions of its channels: user, all, authenticated and its room.
    assert set(position(got[1][2]).partitions()) == {*used, parts.of(f"{prefix}:room:{room}")}

    await first.close()  # a blink: everything below is missed, on four partitions
    await emit(b.url, f"/api/emit/users/{alice}", "dm", 3)
    await emit(a.url, f"/api/emit/rooms/{room}", "chat", 4)
    await emit(a.url, "/api/emit/all", "news", 5)
    await emit(b.url, "/api/emit/authenticated", "members", 6)
    await emit(b.url, f"/api/emit/users/{alice}", "dm", 7)

    back = await Wire.connect(b.url, {"token": token, "recover": True, "pid": pid, "offset": got[1][2]})
    wires.append(back)
    assert back.reply["pid"] == pid
    replay = await back.events_until("recovered")
    assert replay[-1][:2] == ["recovered", {"missed": 5}]
    missed = replay[:-1]
    # All of it, once; within one partition (alice's two dms) in publish order.
    assert sorted(e[1] for e in missed) == [3, 4, 5, 6, 7]
    assert [e[1] for e in missed if e[0] == "dm"] == [3, 7]
    assert moves_forward([e[2] for e in missed]) and replay[-1][2] == missed[-1][2]

    await emit(a.url, f"/api/emit/users/{alice}", "dm", 8)  # and live again, after the replay
    live = await back.event()
    assert live[:2] == ["dm", 8] and moves_forward([missed[-1][2], live[2]])



def test_an_instance_subscribes_only_on_the_shards_that_own_its_channels(redis_cluster_url: str) -> None:
    """One subscriber connection on each master owning a channel the instance holds, none on the
    others (the instance alone under its prefix, so every shard channel of the prefix is its own).
    Its node channel's partition depends on a random tag: fleets are started until one leaves a
    master without any channel of it, so "none on the others" is put to the test."""
    with redis.Redis.from_url(redis_cluster_url) as seed:
        masters = sorted({int(entry[2][1]) for entry in seed.execute_command("CLUSTER", "SLOTS")})
    for _ in range(8):
        fleet = Cluster(unique("cshards"), ("A",), redis_url=redis_cluster_url)
        try:
            held = {}
            for port in masters:
                with redis.Redis(port=port) as node:
                    ours = [c for c in node.execute_command("PUBSUB", "SHARDCHANNELS") if fleet.prefix.encode() in c]
                    connections = [c for c in node.client_list() if c.get("name") == f"{fleet.prefix}:A:sub"]
                held[port] = bool(ours)
                assert len(connections) == (1 if ours else 0), (port, ours, connections)
        finally:
            fleet.close()
        if not all(held.values()):
            return
    pytest.fail("every fleet had a channel on every master: nothing showed a master left alone")

"""Faults only a Redis Cluster has: a master dies and its replica takes over while events flow."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.cluster import wired

from .conftest import Cluster
from .harness import ROOT, Instance, Probe, api, free_cluster_base, token_for, unique, wait_until

pytestmark = pytest.mark.cluster

SCRIPT = str(ROOT / "scripts" / "redis-cluster.sh")


@pytest.fixture
def redis_cluster() -> Iterator[int]:
    """A cluster of this test's own (a failover changes its topology for good): its base port."""
    base = free_cluster_base()
    started = subprocess.run([SCRIPT, "start", str(base)], capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    yield base
    subprocess.run([SCRIPT, "stop", str(base)], capture_output=True, timeout=60, check=False)


@pytest.fixture
def fleet(redis_cluster: int) -> Iterator[Cluster]:
    """Instances A and B on this test's cluster, under a prefix of their own."""
    started = Cluster(unique("fault"), ("A", "B"), redis_url=f"redis://127.0.0.1:{redis_cluster}/0", REDIS_BACKOFF_MAX="0.5")
    try:
        yield started
    finally:
        started.close()


def master_of(base: int, key: str) -> int:
    """The port of the master that owns `key`'s slot."""
    client = redis.Redis(port=base)
    try:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
    finally:
        client.close()
    raise AssertionError(f"no master owns slot of {key}")


def kill_node(base: int, port: int) -> None:
    pid = int(Path(f"/tmp/webapp-redis-cluster-{base}/{port}.pid").read_text())
    os.kill(pid, signal.SIGKILL)


def replicas_caught_up(port: int) -> Callable[[], bool]:
    """A check: have the replicas of the master on `port` acknowledged everything it had written
    when this was called? (INFO replication: the master's offset then, each replica's ack since.)"""
    client = redis.Redis(port=port)
    try:
        target = int(client.info("replication")["master_repl_offset"])
    finally:
        client.close()

    def caught_up() -> bool:
        client = redis.Redis(port=port)
        try:
            info = client.info("replication")
        finally:
            client.close()
        replicas = [value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
        return bool(replicas) and all(int(replica["offset"]) >= target for replica in replicas)

    return caught_up


def healthy_masters(port: int) -> int:
    """Masters not flagged as failing, as the node on `port` sees the cluster."""
    client = redis.Redis(port=port)
    try:
        nodes = client.execute_command("CLUSTER", "NODES").decode()
    finally:
        client.close()
    flags = [line.split()[2].split(",") for line in nodes.splitlines()]
    return sum(1 for flag in flags if "master" in flag and "fail" not in flag)


class Numbered:
    """Numbered events emitted to one user's two sockets (one on each instance), and the checks
    a fault must pass: every acknowledged event on both sockets, once, in order."""

    def __init__(self, fleet: Cluster, probes: list[Probe]) -> None:
        self.fleet, self.probes = fleet, probes
        self.user = unique("alice")
        self.acknowledged: list[int] = []
        self.refused = 0
        self.sent = 0

    async def open(self) -> None:
        token = await token_for(self.fleet.a.url, self.user)
        for instance in self.fleet.instances:
            probe = Probe(f"{self.user}@{instance.name}")
            self.probes.append(await probe.connect(instance.url, token))

    async def emit(self, via: Instance) -> None:
        status, _ = await api(via.url, f"/api/emit/users/{self.user}", {"event": "n", "data": self.sent})
        if status == 202:
            self.acknowledged.append(self.sent)
        else:
            assert status == 503, status  # never a 5xx of another kind, never a hang
            self.refused += 1
        self.sent += 1

    async def all_delivered_once_in_order(self) -> None:
        for probe in self.probes:
            await probe.wait_for("n", len(self.acknowledged), timeout=20)
            got = probe.of("n")
            assert len(got) == len(set(got)), "an event was delivered twice"
            assert [k for k in got if k in set(self.acknowledged)] == self.acknowledged  # all, in order


async def test_a_master_failover_loses_and_duplicates_no_acknowledged_event(
    redis_cluster: int, fleet: Cluster, probes: list[Probe]
) -> None:
    base, events = redis_cluster, Numbered(fleet, probes)
    await events.open()
    for _ in range(20):
        await events.emit(fleet.a)
    await probes[1].wait_for("n", 20)
    # The master owning the user's channel (its partition's history and shard channel) dies.
    victim = master_of(base, wired(fleet.prefix, f"{fleet.prefix}:user:{events.user}"))
    # Replication is asynchronous: an event the master took and died before copying is lost
    # (README, "What can still lose data"). This test is about the failover, not that window.
    await wait_until(replicas_caught_up(victim), "the replica to acknowledge the 20 events")
    kill_node(base, victim)
    killed_at = time.monotonic()
    while len([k for k in events.acknowledged if k >= 20]) < 20:
        assert time.monotonic() - killed_at < 30, f"no failover within 30 s ({events.refused} refused)"
        await events.emit(fleet.a)
        await asyncio.sleep(0.05)  # pacing: about 20 emits a second, not a wait for anything
    alive = next(port for port in range(base, base + 6) if port != victim)
    await wait_until(lambda: healthy_masters(alive) == 3, "a replica promoted to master")
    await events.all_delivered_once_in_order()
    # Both instances followed the user's channel to the promoted replica.
    assert all(i.status()[1]["bus"]["moved_channels"] >= 1 for i in fleet.instances)
    print(f"failover: {events.refused} emits answered 503 during {time.monotonic() - killed_at:.1f}s")


def node_ids(base: int) -> dict[int, str]:
    """port -> node id, for the masters."""
    client = redis.Redis(port=base)
    try:
        nodes = client.execute_command("CLUSTER", "NODES").decode()
    finally:
        client.close()
    found = {}
    for line in nodes.splitlines():
        node_id, address, flags = line.split()[:3]
        if "master" in flags.split(","):
            found[int(address.split("@")[0].rsplit(":", 1)[1])] = node_id
    return found


def migrate_slot_of(base: int, key: str, target: int, pause: float = 0.5) -> None:
    """Move `key`'s slot to the master on `target`, the way redis-cli --cluster reshard does:
    IMPORTING/MIGRATING, MIGRATE of its keys, then the new owner announced to every master.
    It dwells `pause` seconds in each state (a real reshard of many keys takes a while): before
    the keys move, and after, while the old owner still answers ASK for them."""
    ids = node_ids(base)
    source = master_of(base, key)
    src, dst = redis.Redis(port=source), redis.Redis(port=target)
    try:
        slot = int(src.execute_command("CLUSTER", "KEYSLOT", key))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        time.sleep(pause)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        time.sleep(pause)
        for port in ids:
            node = redis.Redis(port=port)
            try:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
            finally:
                node.close()
    finally:
        src.close()
        dst.close()


async def test_moving_a_subscribed_user_channels_slot_under_traffic_loses_and_duplicates_nothing(
    redis_cluster: int, fleet: Cluster, probes: list[Probe]
) -> None:
    """Redis tells the subscribers (`sunsubscribe`) once the slot has moved; the instances follow
    the channel to its new shard and read its history from where they were."""
    base, events = redis_cluster, Numbered(fleet, probes)
    await events.open()
    history = wired(fleet.prefix, f"{fleet.prefix}:user:{events.user}")  # the slot of channel and history
    source = master_of(base, history)
    target = next(port for port in node_ids(base) if port != source)
    moving: asyncio.Future[None] | None = None
    while moving is None or not moving.done() or events.sent < 100:
        if events.sent == 20:  # the slot moves while events flow, in both directions of the seam
            moving = asyncio.get_running_loop().run_in_executor(None, migrate_slot_of, base, history, target)
        await events.emit(fleet.instances[events.sent % 2])
        await asyncio.sleep(0.01)  # pacing the traffic, not a wait for anything
    assert moving is not None
    await moving
    assert master_of(base, history) == target
    await events.all_delivered_once_in_order()
    assert all(i.status()[1]["bus"]["moved_channels"] >= 1 for i in fleet.instances)  # told, and followed
    assert events.refused == 0, f"{events.refused} emits refused while one slot moved"  # none refused
    print(f"reshard: {len(events.acknowledged)} acknowledged, {events.refused} refused")


def shard_without(base: int, keys: list[str]) -> tuple[int, list[int]]:
    """A master owning none of `keys`' slots, and its replicas' ports."""
    owners = {master_of(base, key) for key in keys}
    client = redis.Redis(port=base)
    try:
        nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
    finally:
        client.close()
    ids = node_ids(base)
    master = next(port for port in ids if port not in owners)
    replicas = [
        int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
        for line in nodes
        if line.split()[3] == ids[master]
    ]
    return master, replicas


def user_on(base: int, port: int, prefix: str, *, owned: bool) -> str:
    """A user id whose record (`<prefix>:users:<id>`) and channel both live (or neither lives) on
    the master at `port`."""
    for n in range(1000):
        user = f"u{n}"
        keys = (f"{prefix}:users:{user}", wired(prefix, f"{prefix}:user:{user}"))
        if all((master_of(base, key) == port) == owned for key in keys):
            return user
    raise AssertionError("no such user id in 1,000 tries")


def fixed_keys(prefix: str) -> list[str]:
    """What every instance needs whatever its users: the broadcast channels and presence's table."""
    return [wired(prefix, f"{prefix}:all"), wired(prefix, f"{prefix}:authenticated"), f"{{{prefix}:presence}}:instances"]


async def test_a_whole_shard_down_is_reported_and_the_rest_keeps_working(redis_cluster: int, probes: list[Probe]) -> None:
    base = redis_cluster
    # A prefix whose fixed keys leave one shard free: that shard dies (with three keys on three
    # shards, about one prefix in three).
    prefix = next(p for p in (unique("fault") for _ in range(200)) if len({master_of(base, k) for k in fixed_keys(p)}) < 3)
    master, replicas = shard_without(base, fixed_keys(prefix))
    # Chosen while every node answers (the seed node may be in the shard that dies).
    alive_user = user_on(base, master, prefix, owned=False)
    lost_user = user_on(base, master, prefix, owned=True)
    fleet = Cluster(prefix, ("A", "B"), redis_url=f"redis://127.0.0.1:{base}/0", REDIS_BACKOFF_MAX="0.5")
    try:
        a, b = fleet.instances
        for port in (master, *replicas):
            kill_node(base, port)  # the whole shard: no replica can take over
        await wait_until(
            lambda: a.readyz()[1]["bus"].get("unreachable_shards") == [f"127.0.0.1:{master}"],
            "/readyz to name the dead shard", timeout=15,
        )
        status, body = a.readyz()
        assert status == 200 and body["ready"] is True  # what lives elsewhere is still served

        # Broadcasts and users whose channel and record live on other shards: as before.
        probe = Probe(alive_user)
        probes.append(await probe.connect(b.url, await token_for(a.url, alive_user)))
        assert (await api(a.url, "/api/emit/all", {"event": "news", "data": 1}))[0] == 202
        for n in range(3):
            assert (await api(a.url, f"/api/emit/users/{alive_user}", {"event": "dm", "data": n}))[0] == 202
        assert await probe.wait_for("news") == [1]
        assert await probe.wait_for("dm", 3) == [0, 1, 2]

        # A user whose channel and record live on the dead shard: accepted as in any Redis outage
        # (without the backend's rooms, which cannot be read), and every emit to it answers 503,
        # never a 500 or a hang; so do the REST calls that need its record.
        lost = Probe(lost_user)
        probes.append(await lost.connect(b.url, await token_for(a.url, lost_user)))
        statuses = [(await api(a.url, f"/api/emit/users/{lost_user}", {"event": "dm", "data": n}))[0] for n in range(3)]
        assert statuses == [503, 503, 503]
        status, body = await api(a.url, f"/api/users/{lost_user}/rooms/team:x", method="PUT")
        assert status == 503 and body["error"]["code"] == "bus_unavailable", body
        status, body = await api(a.url, f"/api/users/{alive_user}/rooms/team:x", method="PUT")
        assert status == 200, body
        assert (await api(b.url, "/api/emit/all", {"event": "news", "data": 2}))[0] == 202
        assert await probe.wait_for("news", 2) == [1, 2] and await lost.wait_for("news") == [2]
        assert lost.of("dm") == []
    finally:
        fleet.close()


def stop_node(base: int, port: int, sig: int) -> None:
    pid = int(Path(f"/tmp/webapp-redis-cluster-{base}/{port}.pid").read_text())
    os.kill(pid, sig)


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_a_hung_shard_delays_only_its_own_partitions(redis_cluster: int) -> None:
    """A master that hangs (SIGSTOP: connections accepted, nothing answered; its replica stopped
    too, so no failover ends the hang) holds each publish to its partitions for REDIS_TIMEOUT.
    Emits to users whose channels live on the other shards keep their p99 meanwhile; they used
    to wait behind the hung batch, for REDIS_TIMEOUT each."""
    base = redis_cluster
    prefix = next(p for p in (unique("hang") for _ in range(200)) if len({master_of(base, k) for k in fixed_keys(p)}) < 3)
    master, replicas = shard_without(base, fixed_keys(prefix))
    healthy = [u for u in (f"u{n}" for n in range(400)) if master_of(base, wired(prefix, f"{prefix}:user:{u}")) != master][:8]
    victim = user_on(base, master, prefix, owned=True)
    fleet = Cluster(prefix, ("A",), redis_url=f"redis://127.0.0.1:{base}/0", REDIS_BACKOFF_MAX="0.5")
    stopped: list[int] = []
    try:
        a = fleet.a
        refused: list[int] = []

        async def emit_to(user: str, seconds: float, latencies: list[float] | None) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                started = time.monotonic()
                status, answer = await api(a.url, f"/api/emit/users/{user}", {"event": "n", "data": 1})
                if latencies is not None:
                    assert status == 202, answer
                    latencies.append(time.monotonic() - started)
                else:
                    refused.append(status)

        async def measure(seconds: float) -> list[float]:
            latencies: list[float] = []
            # The victim's emits beside the healthy ones: in every batch there is one for the hung shard.
            await asyncio.gather(
                *(emit_to(user, seconds, latencies) for user in healthy), emit_to(victim, seconds, None)
            )
            return latencies

        before = await measure(3.0)
        for port in (master, *replicas):
            stop_node(base, port, signal.SIGSTOP)
            stopped.append(port)
        refused.clear()
        during = await measure(6.0)
        assert refused and set(refused) == {503}, refused  # the hung shard's own emits: refused in time
        assert len(during) > 100, len(during)
        # Far below REDIS_TIMEOUT (2 s), which each of them waited before; room for a loaded machine.
        assert p99(during) <= max(3 * p99(before), p99(before) + 0.25), (
            f"p99 {p99(during) * 1000:.0f} ms with a shard hung, {p99(before) * 1000:.0f} ms before "
            f"({len(during)} and {len(before)} emits)"
        )
    finally:
        for port in stopped:
            stop_node(base, port, signal.SIGCONT)
        fleet.close()

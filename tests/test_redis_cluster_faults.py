"""Faults only a Redis Cluster has: a master dies and its replica takes over while events flow."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .conftest import Cluster
from .harness import ROOT, Probe, api, free_cluster_base, token_for, unique, wait_until

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


def healthy_masters(port: int) -> int:
    """Masters not flagged as failing, as the node on `port` sees the cluster."""
    client = redis.Redis(port=port)
    try:
        nodes = client.execute_command("CLUSTER", "NODES").decode()
    finally:
        client.close()
    flags = [line.split()[2].split(",") for line in nodes.splitlines()]
    return sum(1 for flag in flags if "master" in flag and "fail" not in flag)


async def test_a_master_failover_loses_and_duplicates_no_acknowledged_event(redis_cluster: int) -> None:
    base = redis_cluster
    prefix = unique("failover")
    fleet = Cluster(prefix, ("A", "B"), redis_url=f"redis://127.0.0.1:{base}/0", REDIS_BACKOFF_MAX="0.5")
    probes: list[Probe] = []
    try:
        a, b = fleet.instances
        user = unique("alice")
        token = await token_for(a.url, user)
        for instance in (a, b):
            probe = Probe(f"{user}@{instance.name}")
            probes.append(await probe.connect(instance.url, token))
        there = probes[1]
        acknowledged: list[int] = []
        refused = 0

        async def emit(n: int) -> None:
            nonlocal refused
            status, _ = await api(a.url, f"/api/emit/users/{user}", {"event": "n", "data": n})
            if status == 202:
                acknowledged.append(n)
            else:
                assert status == 503, status  # never a 5xx of another kind, never a hang
                refused += 1

        for n in range(20):
            await emit(n)
        await there.wait_for("n", 20)
        # The master holding the history (every publish's script runs there) dies.
        victim = master_of(base, f"{{{prefix}}}:replay")
        kill_node(base, victim)
        killed_at = time.monotonic()
        n = 20
        while len([k for k in acknowledged if k >= 20]) < 20:
            assert time.monotonic() - killed_at < 30, f"no failover within 30 s ({refused} refused)"
            await emit(n)
            n += 1
            await asyncio.sleep(0.05)
        alive = next(port for port in range(base, base + 6) if port != victim)
        await wait_until(lambda: healthy_masters(alive) == 3, "a replica promoted to master")
        for probe in probes:
            await probe.wait_for("n", len(acknowledged), timeout=20)
            got = probe.of("n")
            assert len(got) == len(set(got)), "an event was delivered twice"
            assert [k for k in got if k in set(acknowledged)] == acknowledged  # all, in order
        print(f"failover: {refused} emits answered 503 during {time.monotonic() - killed_at:.1f}s")
    finally:
        for probe in probes:
            await probe.close()
        fleet.close()


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


async def test_moving_the_historys_slot_under_traffic_loses_and_duplicates_nothing(redis_cluster: int) -> None:
    base = redis_cluster
    prefix = unique("reshard")
    fleet = Cluster(prefix, ("A", "B"), redis_url=f"redis://127.0.0.1:{base}/0", REDIS_BACKOFF_MAX="0.5")
    probes: list[Probe] = []
    try:
        a, b = fleet.instances
        user = unique("alice")
        token = await token_for(a.url, user)
        for instance in (a, b):
            probe = Probe(f"{user}@{instance.name}")
            probes.append(await probe.connect(instance.url, token))
        acknowledged: list[int] = []
        refused = 0
        history = f"{{{prefix}}}:replay"
        source = master_of(base, history)
        target = next(port for port in node_ids(base) if port != source)
        moving: asyncio.Future[None] | None = None
        n = 0
        while moving is None or not moving.done() or n < 100:
            if n == 20:  # the slot moves while events flow, in both directions of the seam
                moving = asyncio.get_running_loop().run_in_executor(None, migrate_slot_of, base, history, target)
            instance = a if n % 2 == 0 else b
            status, _ = await api(instance.url, f"/api/emit/users/{user}", {"event": "n", "data": n})
            if status == 202:
                acknowledged.append(n)
            else:
                assert status == 503, status
                refused += 1
            n += 1
            await asyncio.sleep(0.01)
        assert moving is not None
        await moving
        assert master_of(base, history) == target
        for probe in probes:
            await probe.wait_for("n", len(acknowledged), timeout=20)
            got = probe.of("n")
            assert len(got) == len(set(got)), "an event was delivered twice"
            assert [k for k in got if k in set(acknowledged)] == acknowledged
        assert refused <= 5, f"{refused} emits refused while one slot moved"
        print(f"reshard: {len(acknowledged)} acknowledged, {refused} refused")
    finally:
        for probe in probes:
            await probe.close()
        fleet.close()

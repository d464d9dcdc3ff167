"""Classic against sharded pub/sub on a local Redis Cluster: `python -m bench.cluster_publish`.

What it decides: how the fleet-wide channels (`all`, `authenticated`) should travel on a cluster.
Classic PUBLISH reaches subscribers on every node, since the cluster bus copies each message to
every node; SPUBLISH stays on the shard that owns the channel's slot, so every instance must
hold a connection to that shard. Both are measured in the same run, on the same cluster
(scripts/redis-cluster.sh: 3 masters, 3 replicas), with one subscriber connection per master
for classic (instances connected to different nodes) and the same number on the owning shard
for sharded:

- publishes/s at saturation, from one pipelining client;
- server CPU per publish on the channel's owner and on all six nodes (INFO cpu; replicas receive
  pub/sub traffic too), and how many nodes do any work for it.

Medians of several rounds, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b'{"v":1,"id":"0123456789abcdef0123456789abcdef","scope":"all","event":"news","data":{"s":1},"ts":1.0}'
CHANNEL = "bench:all"


async def _masters(seed: int) -> list[int]:
    client = Redis(port=seed)
    try:
        slots = await client.execute_command("CLUSTER", "SLOTS")
    finally:
        await client.aclose()
    return sorted({int(entry[2][1]) for entry in slots})


async def _nodes(seed: int) -> list[int]:
    """Every node, replicas included: they receive pub/sub traffic too."""
    client = Redis(port=seed)
    try:
        nodes = (await client.execute_command("CLUSTER", "NODES")).decode()
    finally:
        await client.aclose()
    return sorted(int(line.split()[1].split("@")[0].rsplit(":", 1)[1]) for line in nodes.splitlines())


async def _cpu(port: int) -> float:
    client = Redis(port=port)
    try:
        info = await client.info("cpu")
    finally:
        await client.aclose()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _drain(conn: Any, expected: int, kind: bytes) -> int:
    got = 0
    while got < expected:
        reply = await conn.read_response(timeout=10)
        if reply is None:
            break
        if reply[0] == kind:
            got += 1
    return got


async def round_of(mode: str, seed: int, count: int, batch: int) -> dict[str, Any]:
    masters = await _masters(seed)
    cluster = RedisCluster(host="127.0.0.1", port=seed)
    await cluster.initialize()
    owner = int(cluster.get_node_from_key(CHANNEL).port)  # the shard of the channel's slot
    ports = masters if mode == "classic" else [owner] * len(masters)
    command, subscribe, kind = (
        ("PUBLISH", "SUBSCRIBE", b"message") if mode == "classic" else ("SPUBLISH", "SSUBSCRIBE", b"smessage")
    )
    subscribers = []
    for port in ports:
        conn = Redis(port=port, protocol=2).connection_pool.make_connection()
        await conn.connect()
        await conn.send_command(subscribe, CHANNEL)
        await conn.read_response(timeout=5)
        subscribers.append(conn)
    target = Redis(port=owner) if mode == "sharded" else Redis(port=seed)
    nodes = await _nodes(seed)
    before = {port: await _cpu(port) for port in nodes}
    started = time.perf_counter()
    readers = [asyncio.create_task(_drain(conn, count, kind)) for conn in subscribers]
    sent = 0
    while sent < count:
        async with target.pipeline(transaction=False) as pipe:
            for _ in range(min(batch, count - sent)):
                pipe.execute_command(command, CHANNEL, MESSAGE)
            await pipe.execute()
        sent += min(batch, count - sent)
    received = await asyncio.gather(*readers)
    elapsed = time.perf_counter() - started
    after = {port: await _cpu(port) for port in nodes}
    for conn in subscribers:
        await conn.disconnect()
    await target.aclose()
    await cluster.aclose()
    cpu_us = {port: (after[port] - before[port]) / count * 1e6 for port in nodes}
    return {
        "mode": mode,
        "publishes_per_s": count / elapsed,
        "delivered": sum(received),
        "cpu_us_per_publish": sum(cpu_us.values()),
        "busy_nodes": sum(1 for value in cpu_us.values() if value > 0.5),
        "owner_cpu_us": cpu_us[owner],
    }


async def main(seed: int, rounds: int, count: int, batch: int) -> None:
    results: dict[str, list[dict[str, Any]]] = {"classic": [], "sharded": []}
    for _ in range(rounds):
        for mode in ("classic", "sharded"):  # interleaved: drift hits both alike
            results[mode].append(await round_of(mode, seed, count, batch))
    print(f"{count} publishes of {len(MESSAGE)} bytes per round, pipelines of {batch}, medians of {rounds} rounds")
    print("mode     publishes/s  server CPU us/publish (all 6 nodes)  on the owner  nodes working  delivered")
    for mode, runs in results.items():
        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        print(
            f"{mode:8} {median('publishes_per_s'):11,.0f}  {median('cpu_us_per_publish'):34.1f}  "
            f"{median('owner_cpu_us'):12.1f}  {median('busy_nodes'):13.0f}  {median('delivered'):9,.0f}"
        )
    classic, sharded = (statistics.median(r["publishes_per_s"] for r in results[m]) for m in ("classic", "sharded"))
    print(f"sharded/classic publishes/s: {sharded / classic:.2f}x")


def cluster_bench_arguments(doc: str, *, base: int) -> argparse.ArgumentParser:
    """The options every benchmark on a local cluster takes: rounds, events per round, ports."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--base", type=int, default=base, help="the local cluster's first port")
    return parser


def run() -> None:
    parser = cluster_bench_arguments(__doc__ or "", base=7300)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    on_local_cluster(args.base, main(args.base, args.rounds, args.count, args.batch))


def on_local_cluster(base: int, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` with a local cluster of scripts/redis-cluster.sh on ports `base`.., then stop it."""
    script = str(ROOT / "scripts" / "redis-cluster.sh")
    subprocess.run([script, "start", str(base)], check=True, capture_output=True, timeout=60)
    try:
        asyncio.run(work)
    finally:
        subprocess.run([script, "stop", str(base)], check=False, capture_output=True, timeout=60)


if __name__ == "__main__":
    run()

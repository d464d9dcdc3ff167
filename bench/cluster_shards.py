"""The app's publish path on one shard against three: `python -m bench.cluster_shards`.

The app publishes the events of one partition that are queued together with one script call,
on the shard that owns the partition: per event XADD to the partition's history and SPUBLISH,
then one trim. With a single partition every event runs on one shard; with the default 16
partitions, spread evenly over the slot space, each shard of the local cluster
(scripts/redis-cluster.sh: 3 masters, 3 replicas) runs about a third of them.
Both go through the app's own RedisBus, on the same cluster, in interleaved rounds (medians):

- publishes/s at saturation from one client process (on 2 cores the client is the limit, not
  Redis; 16 partitions split each batch into up to 16 script calls, which costs the client);
- the same single partition with the script sent as text each time (EVAL, as the app did before
  it sent the script's hash), for what that costs Redis;
- per master, busiest first: its share of the script calls and its CPU per publish of the whole
  round (INFO commandstats, INFO cpu), and how many events a script call carried on average (a
  batch splits into one call per partition). The busiest master's CPU per publish bounds the
  fleet: a shard's core saturates at about 1 / that many publishes a second.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

from redis.asyncio import Redis, RedisCluster

from webapp.realtime.bus import Mark, RedisBus
from webapp.realtime.bus.partitions import CLUSTER_PARTITIONS, Partitions

from .cluster_publish import _cpu, _masters, cluster_bench_arguments, on_local_cluster

MESSAGE = b'{"v":1,"id":"0123456789abcdef0123456789abcdef","scope":"user","user_id":"u1","event":"dm","data":{"s":1},"ts":1.0}'
USERS = 1000


async def _scripts(port: int) -> int:
    client = Redis(port=port)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(stats.get(f"cmdstat_{verb}", {}).get("calls", 0)) for verb in ("eval", "evalsha"))


async def _ignore(channel: str, message: bytes, mark: Mark | None) -> None:
    return None


async def _no_gap(reason: str) -> None:
    return None


async def round_of(partitions: int, seed: int, count: int, in_flight: int, by_hash: bool = True) -> dict[str, Any]:
    prefix = f"bench-shards-{uuid.uuid4().hex[:8]}"
    history_key = f"{{{prefix}}}:replay"
    bus = RedisBus(
        f"redis://127.0.0.1:{seed}/0", history_key=history_key, partitions=partitions, name=prefix,
        script_by_hash=by_hash,
    )
    await bus.start(_ignore, _no_gap)
    masters = await _masters(seed)
    try:
        deadline = time.monotonic() + 10
        while not bus.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("the bus did not reach the cluster")
            await asyncio.sleep(0.05)
        channels = [f"{prefix}:user:u{n}" for n in range(USERS)]
        cpu_before = {port: await _cpu(port) for port in masters}
        scripts_before = {port: await _scripts(port) for port in masters}
        started = time.perf_counter()
        sent = 0
        while sent < count:
            wave = min(in_flight, count - sent)
            await asyncio.gather(*(bus.publish(channels[(sent + i) % USERS], MESSAGE) for i in range(wave)))
            sent += wave
        elapsed = time.perf_counter() - started
        cpu = {port: (await _cpu(port) - cpu_before[port]) / count * 1e6 for port in masters}
        scripts = {port: await _scripts(port) - scripts_before[port] for port in masters}
    finally:
        await bus.close()
        await _forget(seed, Partitions(history_key, partitions, sharded=True))
    # Busiest master first: which one owns a partition changes with each round's prefix.
    busiest = sorted(masters, key=lambda port: scripts[port], reverse=True)
    return {
        "publishes_per_s": count / elapsed,
        "cpu_us": [cpu[port] for port in busiest],
        "script_share": [scripts[port] / max(1, sum(scripts.values())) for port in busiest],
        "per_script": count / max(1, sum(scripts.values())),
    }


async def _forget(seed: int, parts: Partitions) -> None:
    cluster = RedisCluster(host="127.0.0.1", port=seed)
    try:
        for partition in range(parts.count):
            await cluster.delete(parts.stream(partition))
    finally:
        await cluster.aclose()


async def main(seed: int, rounds: int, count: int, in_flight: int) -> None:
    layouts = {
        "1 partition (one shard)": (1, True),
        f"{CLUSTER_PARTITIONS} partitions (3 shards)": (CLUSTER_PARTITIONS, True),
        "1 partition, script as text": (1, False),  # EVAL: Redis reads and hashes it every time
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in layouts}
    for _ in range(rounds):
        for name, (partitions, by_hash) in layouts.items():  # interleaved: drift hits all alike
            results[name].append(await round_of(partitions, seed, count, in_flight, by_hash))
    print(f"{count} publishes of {len(MESSAGE)} bytes per round to {USERS} users, {in_flight} in flight, medians of {rounds} rounds")
    print("layout                        publishes/s  CPU us/publish, busiest master first  share of scripts  events/script  busiest master")
    busiest: list[float] = []
    for name, runs in results.items():
        rate = statistics.median(run["publishes_per_s"] for run in runs)
        cpu, share = (_medians(runs, key) for key in ("cpu_us", "script_share"))
        per_script = statistics.median(run["per_script"] for run in runs)
        busiest.append(max(cpu))
        print(
            f"{name:29} {rate:11,.0f}  {' / '.join(f'{c:.1f}' for c in cpu):>36}  "
            f"{' / '.join(f'{s:.0%}' for s in share):>16}  {per_script:13.1f}  {max(cpu):.1f} us"
        )
    single, spread, as_text = busiest
    print(f"busiest master's CPU per publish, {CLUSTER_PARTITIONS} partitions / 1: {spread / single:.2f}x "
          f"(a ceiling {single / spread:.1f}x as high)")
    print(f"one master's CPU per publish, script by hash / as text: {single / as_text:.2f}x")


def _medians(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Per master (busiest first), the median over the rounds of `key`."""
    return [statistics.median(run[key][i] for run in runs) for i in range(len(runs[0][key]))]


def run() -> None:
    parser = cluster_bench_arguments(__doc__ or "", base=7400)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    on_local_cluster(args.base, main(args.base, args.rounds, args.count, args.in_flight))


if __name__ == "__main__":
    run()

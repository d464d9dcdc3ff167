"""The five workloads, client side. Each returns flat metrics, including lost and duplicated counts.

Payloads are {"s": sequence number, "t": send time (time.monotonic())}; sender and receivers
live in this one process, so the clock is shared.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from . import procfs
from .deliveries import Deliveries, percentile
from .fleet import WAIT, Fleet, closed_loop, fixed_rate

Metrics = dict[str, Any]
Params = dict[str, Any]
DRAIN = 10.0  # longest wait for the last deliveries after the load stops, in seconds


Load = Callable[[Deliveries, float], Awaitable[None]]  # drives emits into a tracker for some seconds


async def _measure(
    fleet: Fleet, load: Load, p: Params, measured: Collection[int] | None = None
) -> tuple[Metrics, Deliveries, list[float], float]:
    """Warm up, then run the load; return metrics, the tracker, CPU seconds per instance, wall time.

    The warm-up's timings are dropped but its losses and duplicates are not: they count.
    """
    faults = {"lost": 0, "duplicated": 0, "misdelivered": 0}
    if p.get("warmup"):
        warm = Deliveries()
        fleet.sink = warm.on_event
        await load(warm, p["warmup"])
        await warm.drain(DRAIN)
        faults = {key: warm.summary()[key] for key in faults}
    deliveries = Deliveries(measured)
    fleet.sink = deliveries.on_event
    before, started, client_before = fleet.cpu(), time.monotonic(), time.process_time()
    await load(deliveries, p["seconds"])
    await deliveries.drain(DRAIN)
    after, elapsed = fleet.cpu(), time.monotonic() - started
    metrics = deliveries.summary()
    # Were the clients keeping up? Near 100 % would mean the load generator, not the server, limits.
    metrics["loadgen_cpu_pct"] = (time.process_time() - client_before) / elapsed * 100
    for key, count in faults.items():
        metrics[key] += count
    metrics["rest_failures"] = fleet.rest_failures
    return metrics, deliveries, [b - a for a, b in zip(before, after)], elapsed


def _server_cost(metrics: Metrics, cpu: list[float]) -> None:
    delivered = metrics["deliveries"]
    metrics["server_cpu_us_per_delivery"] = sum(cpu) / delivered * 1e6 if delivered else math.nan


async def user_fanout(fleet: Fleet, p: Params) -> Metrics:
    """W1: each user has a socket on A and one on B; REST emits to users, alternating A and B."""
    users = [fleet.user("w1", i) for i in range(p["users"])]
    await fleet.open([(t, u) for u in users for t in (0, 1)])

    async def load(deliveries: Deliveries, seconds: float) -> None:
        async def send(seq: int) -> None:
            u = seq % len(users)
            sent_at = time.monotonic()
            deliveries.expect(seq, (2 * u, 2 * u + 1), sent_at)
            await fleet.rest_emit(seq % 2, f"/api/emit/users/{users[u]}", "dm", {"s": seq, "t": sent_at})

        await closed_loop(p["window"], seconds, send, lambda seq: deliveries.wait(seq, WAIT))

    metrics, _, cpu, _ = await _measure(fleet, load, p)
    _server_cost(metrics, cpu)
    return metrics


async def broadcast(fleet: Fleet, p: Params) -> Metrics:
    """W2: sockets split across A and B; REST emits to all at a fixed rate, alternating A and B."""
    count = p["sockets"]
    await fleet.open([(i % 2, fleet.user("w2", i)) for i in range(count)])
    everyone = range(count)

    async def load(deliveries: Deliveries, seconds: float) -> None:
        async def send(seq: int) -> None:
            sent_at = time.monotonic()
            deliveries.expect(seq, everyone, sent_at)
            await fleet.rest_emit(seq % 2, "/api/emit/all", "news", {"s": seq, "t": sent_at})

        await fixed_rate(p["rate"], seconds, send)

    metrics, _, cpu, _ = await _measure(fleet, load, p)
    _server_cost(metrics, cpu)
    return metrics


async def gateway(fleet: Fleet, p: Params) -> Metrics:
    """W3: a user's socket on A emits `events`; latency is until the socket on B has the answer.

    Each user sends again once B got the previous one. The asking socket must get exactly one
    direct answer too; both count for losses and duplicates, only B's for latency.
    """
    users = [fleet.user("w3", i) for i in range(p["users"])]
    await fleet.open([(t, u) for u in users for t in (0, 1)])
    far = set(range(1, 2 * len(users), 2))

    async def load(deliveries: Deliveries, seconds: float) -> None:
        deadline = time.monotonic() + seconds

        async def user_loop(u: int) -> None:
            seq = u
            while time.monotonic() < deadline:
                sent_at = time.monotonic()
                deliveries.expect(seq, (2 * u, 2 * u + 1), sent_at)
                await fleet.sockets[2 * u].emit("events", {"s": seq, "t": sent_at})
                await deliveries.wait(seq, WAIT)
                seq += len(users)

        await asyncio.gather(*(user_loop(u) for u in range(len(users))))

    metrics, deliveries, cpu, _ = await _measure(fleet, load, p, measured=far)
    # Throughput of the propagated copies only, the ones that crossed instances.
    metrics["deliveries_per_s"] *= len(deliveries.latencies) / max(1, metrics["deliveries"])
    _server_cost(metrics, cpu)
    return metrics


async def connections(fleet: Fleet, p: Params) -> Metrics:
    """W4: open N sockets of N users on instance A; connect rate and resident memory per socket."""
    count = p["sockets"]
    pid = fleet.targets[0].pid
    await asyncio.sleep(0.5)  # let the previous workload's sockets finish closing
    rss_before = procfs.rss_kib(pid)
    started = time.monotonic()
    durations = await fleet.open([(0, fleet.user("w4", i)) for i in range(count)], p["concurrency"])
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)  # settle: late allocations of the last handshakes
    rss_after = procfs.rss_kib(pid)
    # One broadcast proves every socket is really live, exactly once.
    deliveries = Deliveries()
    fleet.sink = deliveries.on_event
    sent_at = time.monotonic()
    deliveries.expect(0, range(count), sent_at)
    await fleet.rest_emit(0, "/api/emit/all", "news", {"s": 0, "t": sent_at})
    await deliveries.drain(DRAIN)
    check = deliveries.summary()
    ordered = sorted(durations)
    return {
        "connects_per_s": count / elapsed,
        "connect_p50_ms": percentile(ordered, 50) * 1000,
        "connect_p99_ms": percentile(ordered, 99) * 1000,
        "kib_per_socket": (rss_after - rss_before) / count,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "lost": check["lost"],
        "duplicated": check["duplicated"],
        "misdelivered": check["misdelivered"],
        "rest_failures": fleet.rest_failures,
    }


async def instances(fleet: Fleet, p: Params) -> Metrics:
    """W5: users held by instance 0 only; REST emits to them on instance 0; CPU of every instance."""
    users = [fleet.user("w5", i) for i in range(p["users"])]
    await fleet.open([(0, u) for u in users])

    async def load(deliveries: Deliveries, seconds: float) -> None:
        async def send(seq: int) -> None:
            u = seq % len(users)
            sent_at = time.monotonic()
            deliveries.expect(seq, (u,), sent_at)
            await fleet.rest_emit(0, f"/api/emit/users/{users[u]}", "dm", {"s": seq, "t": sent_at})

        await fixed_rate(p["rate"], seconds, send)

    metrics, deliveries, cpu, elapsed = await _measure(fleet, load, p)
    others = cpu[1:]
    metrics.update(
        {
            "instances": len(fleet.targets),
            "holder_cpu_pct": cpu[0] / elapsed * 100,
            "holder_cpu_ms_per_1k_emits": cpu[0] * 1000 / deliveries.emits * 1000,
            "other_cpu_pct": statistics.fmean(others) / elapsed * 100 if others else math.nan,
            "other_cpu_ms_per_1k_emits": (
                statistics.fmean(others) * 1000 / deliveries.emits * 1000 if others else math.nan
            ),
            # What the whole fleet pays, beyond the holder, for users it does not hold.
            "others_cpu_ms_per_1k_emits_sum": sum(others) * 1000 / deliveries.emits * 1000,
        }
    )
    return metrics


WORKLOADS: dict[str, Callable[[Fleet, Params], Awaitable[Metrics]]] = {
    "w1": user_fanout,
    "w2": broadcast,
    "w3": gateway,
    "w4": connections,
    "w5": instances,
}

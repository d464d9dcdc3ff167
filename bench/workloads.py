"""The five workloads, client side. Each returns flat metrics, including lost and duplicated counts.

Payloads are {"s": sequence number, "t": send time (time.monotonic())}; sender and receivers
live in this one process, so the clock is shared. W1 and W2 take `recover` (default False): their
sockets then opt in to connection state recovery, and every event must carry a well-formed offset
after the socket's previous one (`offset_faults` counts what did not, and any offset a socket that
did not opt in got).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from typing import Any

from . import procfs
from .deliveries import Deliveries, percentile
from .fleet import WAIT, Fleet, closed_loop, fixed_rate
from .params import DRAIN, KEEP_UP, LOADGEN_BOUND_PCT, P99_LIMIT_MS, step_seconds

Metrics = dict[str, Any]
Params = dict[str, Any]
SETTLE = 1.0  # pause after opening many sockets at once, in seconds
# Any of these fails the suite. offset_faults: see wire.OffsetChecks.
FAULTS = ("lost", "duplicated", "misdelivered", "rest_failures", "offset_faults")


Load = Callable[[Deliveries, float], Awaitable[None]]  # drives emits into a tracker for some seconds
# Sends emit `seq` and tells the tracker who must receive it: one shape for closed and open loops.
Emit = Callable[[Deliveries, int], Coroutine[Any, Any, None]]


async def _measure(
    fleet: Fleet, load: Load, p: Params, measured: Collection[int] | None = None
) -> tuple[Metrics, Deliveries, list[float], float]:
    """Warm up, then run the load; return metrics, the tracker, CPU seconds per instance, wall time.

    The warm-up's timings are dropped but its losses and duplicates are not: they count.
    """
    faults = {"lost": 0, "duplicated": 0, "misdelivered": 0}
    refused_before, offset_faults_before = fleet.rest_failures, fleet.offset_faults()
    if p.get("warmup"):
        warm = Deliveries()
        fleet.sink = warm.on_event
        await load(warm, p["warmup"])
        await warm.drain(DRAIN)
        faults = {key: warm.summary()[key] for key in faults}
    deliveries = Deliveries(measured)
    fleet.sink = deliveries.on_event
    with _no_collector_pauses():
        before, started, client_before = fleet.cpu(), time.monotonic(), time.process_time()
        await load(deliveries, p["seconds"])
        await deliveries.drain(DRAIN)
        after, elapsed = fleet.cpu(), time.monotonic() - started
    metrics = deliveries.summary()
    # Were the clients keeping up? Near 100 % would mean the load generator, not the server, limits.
    metrics["loadgen_cpu_pct"] = (time.process_time() - client_before) / elapsed * 100
    for key, count in faults.items():
        metrics[key] += count
    metrics["rest_failures"] = fleet.rest_failures - refused_before
    metrics["offset_faults"] = fleet.offset_faults() - offset_faults_before
    return metrics, deliveries, [b - a for a, b in zip(before, after)], elapsed


@contextlib.contextmanager
def _no_collector_pauses() -> Iterator[None]:
    """No garbage collection in the load generator while it timestamps deliveries.

    Its heap holds every expected delivery and every socket: a full collection walks all of it,
    and the pause would be booked as server latency. Collect before and after instead.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _faulty(metrics: Metrics) -> bool:
    return any(metrics[key] for key in FAULTS)


async def _half_load(
    fleet: Fleet, emit: Emit, metrics: Metrics, p: Params, measured: Collection[int] | None = None
) -> None:
    """Open loop at half the emits/s the closed loop just reached: latency when not saturated.

    Adds `half_load_*` to `metrics` and its faults to theirs. Its seconds run without a warm-up:
    the closed loop has just warmed the same sockets.
    """
    rate = metrics["emits_per_s"] / 2
    if not (p.get("half_seconds") and rate > 0):  # off, or no saturation (NaN) to take half of
        return

    async def load(deliveries: Deliveries, seconds: float) -> None:
        await fixed_rate(rate, seconds, lambda seq: emit(deliveries, seq))

    half, _, _, _ = await _measure(fleet, load, {"seconds": p["half_seconds"]}, measured)
    metrics.update(
        half_load_rate=rate,
        half_load_p50_ms=half["p50_ms"],
        half_load_p99_ms=half["p99_ms"],
        half_load_max_ms=half["max_ms"],
    )
    for key in (*FAULTS, "late"):
        metrics[key] += half[key]


def _closed(emit: Emit, window: int) -> Load:
    """A closed loop of `window` emits in flight, each waiting for all its deliveries."""

    async def load(deliveries: Deliveries, seconds: float) -> None:
        await closed_loop(window, seconds, lambda seq: emit(deliveries, seq), lambda seq: deliveries.wait(seq, WAIT))

    return load


def _server_cost(metrics: Metrics, cpu: list[float]) -> None:
    delivered = metrics["deliveries"]
    metrics["server_cpu_us_per_delivery"] = sum(cpu) / delivered * 1e6 if delivered else math.nan


async def user_fanout(fleet: Fleet, p: Params) -> Metrics:
    """W1: each user has a socket on A and one on B; REST emits to users, alternating A and B.

    W1b (`per_call` > 1): each call is `POST /api/emit/users` to that many users at once.
    """
    users = [fleet.user("w1", i) for i in range(p["users"])]
    await fleet.open([(t, u) for u in users for t in (0, 1)], recover=p.get("recover", False))
    per_call = min(p.get("per_call", 1), len(users))

    async def emit(deliveries: Deliveries, seq: int) -> None:
        sent_at = time.monotonic()
        if per_call > 1:
            chosen = [(seq * per_call + k) % len(users) for k in range(per_call)]
            deliveries.expect(seq, [2 * u + t for u in chosen for t in (0, 1)], sent_at)
            await fleet.rest_emit(
                seq % 2, "/api/emit/users", "dm", {"s": seq, "t": sent_at}, user_ids=[users[u] for u in chosen]
            )
            return
        u = seq % len(users)
        deliveries.expect(seq, (2 * u, 2 * u + 1), sent_at)
        await fleet.rest_emit(seq % 2, f"/api/emit/users/{users[u]}", "dm", {"s": seq, "t": sent_at})

    metrics, _, cpu, _ = await _measure(fleet, _closed(emit, p["window"]), p)
    _server_cost(metrics, cpu)
    await _half_load(fleet, emit, metrics, p)
    metrics.update(fleet.offset_checks())
    return metrics


async def broadcast(fleet: Fleet, p: Params) -> Metrics:
    """W2: sockets split across A and B; REST emits to all, alternating A and B, at rising rates.

    Each rate is a step: warm-up, measurement, full drain. The sweep stops at the first step
    that fails (see `_step`): higher rates would only be further over the limit.
    """
    count = p["sockets"]
    await fleet.open([(i % 2, fleet.user("w2", i)) for i in range(count)], recover=p.get("recover", False))
    await asyncio.sleep(SETTLE)  # the servers finish the handshakes' follow-up work before rate 1
    everyone = range(count)

    def at(rate: float) -> Load:
        async def load(deliveries: Deliveries, seconds: float) -> None:
            async def send(seq: int) -> None:
                sent_at = time.monotonic()
                deliveries.expect(seq, everyone, sent_at)
                await fleet.rest_emit(seq % 2, "/api/emit/all", "news", {"s": seq, "t": sent_at})

            await fixed_rate(rate, seconds, send)

        return load

    steps: list[Metrics] = []
    for rate in p["rates"]:
        steps.append(await _step(fleet, at(rate), rate, count, p))
        if not steps[-1]["pass"]:
            break
    return {**_sweep(steps, count, p["rates"]), **fleet.offset_checks()}


async def _step(fleet: Fleet, load: Load, rate: float, sockets: int, p: Params) -> Metrics:
    """One fixed rate: passes when p99 is in bounds, the servers kept up, and nothing went wrong."""
    metrics, deliveries, cpu, _ = await _measure(fleet, load, {**p, "seconds": step_seconds(p, rate)})
    _server_cost(metrics, cpu)
    offered = rate * sockets
    # Deliveries over the schedule's own length (emits / rate), or longer if the servers fell
    # behind it: a fencepost-free "did they keep up" even for a handful of emits.
    span = (
        deliveries.last_received - deliveries.first_sent
        if deliveries.first_sent is not None and deliveries.last_received is not None
        else math.inf
    )
    achieved = metrics["deliveries"] / max(deliveries.emits / rate, span)
    passed = metrics["p99_ms"] <= P99_LIMIT_MS and achieved >= KEEP_UP * offered and not _faulty(metrics)
    return {
        "rate": rate,
        "offered_deliveries_per_s": offered,
        "achieved_deliveries_per_s": achieved,
        "pass": passed,
        **metrics,
    }


def _sweep(steps: list[Metrics], sockets: int, rates: list[float]) -> Metrics:
    """W2's metrics: the highest passing rate; the other figures from that step (else the first)."""
    passing = [step for step in steps if step["pass"]]
    shown = passing[-1] if passing else steps[0]
    metrics: Metrics = {
        key: shown[key] for key in ("p50_ms", "p99_ms", "max_ms", "server_cpu_us_per_delivery")
    }
    metrics.update(
        deliveries_per_s=shown["achieved_deliveries_per_s"],
        sockets=sockets,
        sustained_rate=shown["rate"] if passing else 0,
        sustained_deliveries_per_s=shown["offered_deliveries_per_s"] if passing else 0,
        # What 0 means: below the lowest step (the report turns it into a bound on the ratio).
        lowest_offered_deliveries_per_s=rates[0] * sockets,
        # Every step passed: the sustained rate is only a lower bound.
        sweep_capped=len(passing) == len(rates),
        loadgen_cpu_pct=max(step["loadgen_cpu_pct"] for step in steps),
        # Where the sweep stopped (its failing step), and whether the client was saturated there.
        stop_loadgen_cpu_pct=steps[-1]["loadgen_cpu_pct"] if not steps[-1]["pass"] else None,
        loadgen_bound=not steps[-1]["pass"] and steps[-1]["loadgen_cpu_pct"] >= LOADGEN_BOUND_PCT,
        steps=steps,
    )
    for key in (*FAULTS, "late"):
        metrics[key] = sum(step[key] for step in steps)
    return metrics


async def gateway(fleet: Fleet, p: Params) -> Metrics:
    """W3: a user's socket on A emits `events`; latency is until the socket on B has the answer.

    Each user sends again once B got the previous one. The asking socket must get exactly one
    direct answer too; both count for losses and duplicates, only B's for latency.
    """
    users = [fleet.user("w3", i) for i in range(p["users"])]
    await fleet.open([(t, u) for u in users for t in (0, 1)])
    far = set(range(1, 2 * len(users), 2))

    async def emit(deliveries: Deliveries, seq: int) -> None:
        u = seq % len(users)  # user u's socket on A asks; its socket on B must hear it
        sent_at = time.monotonic()
        deliveries.expect(seq, (2 * u, 2 * u + 1), sent_at)
        await fleet.sockets[2 * u].emit("events", {"s": seq, "t": sent_at})

    async def load(deliveries: Deliveries, seconds: float) -> None:
        deadline = time.monotonic() + seconds

        async def user_loop(u: int) -> None:
            seq = u
            while time.monotonic() < deadline:
                await emit(deliveries, seq)
                await deliveries.wait(seq, WAIT)
                seq += len(users)

        await asyncio.gather(*(user_loop(u) for u in range(len(users))))

    metrics, deliveries, cpu, _ = await _measure(fleet, load, p, measured=far)
    # Throughput of the propagated copies only, the ones that crossed instances.
    metrics["deliveries_per_s"] *= len(deliveries.latencies) / max(1, metrics["deliveries"])
    _server_cost(metrics, cpu)
    await _half_load(fleet, emit, metrics, p, measured=far)
    return metrics


async def gateway_fanout(fleet: Fleet, p: Params) -> Metrics:
    """W3f: one user's socket on A emits `events`, `window` emits in flight; its `receivers`
    sockets on B must each hear every answer (latency and deliveries/s count those), and the
    asking socket its one direct answer. Then `one_seconds` with one emit in flight: the latency
    of a lone message, not of a queue.
    """
    user = fleet.user("w3f", 0)
    first = len(fleet.sockets)
    await fleet.open([(0, user)] + [(1, user)] * p["receivers"])
    everyone = range(first, first + 1 + p["receivers"])
    far = set(everyone[1:])
    sender = fleet.sockets[first]

    async def emit(deliveries: Deliveries, seq: int) -> None:
        sent_at = time.monotonic()
        deliveries.expect(seq, everyone, sent_at)
        await sender.emit("events", {"s": seq, "t": sent_at})

    metrics, deliveries, cpu, _ = await _measure(fleet, _closed(emit, p["window"]), p, measured=far)
    metrics["deliveries_per_s"] *= len(deliveries.latencies) / max(1, metrics["deliveries"])
    _server_cost(metrics, cpu)
    await _half_load(fleet, emit, metrics, p, measured=far)
    if p.get("one_seconds"):
        one, _, _, _ = await _measure(fleet, _closed(emit, 1), {"seconds": p["one_seconds"]}, measured=far)
        metrics.update(one_in_flight_p50_ms=one["p50_ms"], one_in_flight_p99_ms=one["p99_ms"])
        for key in (*FAULTS, "late"):
            metrics[key] += one[key]
    return metrics


async def connections(fleet: Fleet, p: Params) -> Metrics:
    """W4: open N sockets of N users on instance A; connect rate, resident memory per socket, and
    the server CPU the sockets cost while idle (over `idle_seconds`: a ping interval pings each once)."""
    count = p["sockets"]
    pid = fleet.targets[0].pid
    await asyncio.sleep(0.5)  # let the previous workload's sockets finish closing
    rss_before = procfs.rss_kib(pid)
    cpu_before, started, client_before = fleet.cpu(), time.monotonic(), time.process_time()
    durations = await fleet.open([(0, fleet.user("w4", i)) for i in range(count)], p["concurrency"])
    elapsed = time.monotonic() - started
    server_cpu = fleet.cpu()[0] - cpu_before[0]
    # The client's own handshakes cost about what the server's do: near 100 % of its one core,
    # it sets the pace, and the connects/s of both apps say more about it than about them.
    client_pct = (time.process_time() - client_before) / elapsed * 100
    await asyncio.sleep(1.0)  # settle: late allocations of the last handshakes
    rss_after = procfs.rss_kib(pid)
    idle_seconds = float(p.get("idle_seconds", 0))
    idle_cpu = fleet.cpu()[0]
    await asyncio.sleep(idle_seconds)  # the measurement itself: nothing is sent meanwhile
    idle_cpu = fleet.cpu()[0] - idle_cpu
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
        "server_cpu_us_per_connect": server_cpu / count * 1e6,
        "loadgen_cpu_pct": client_pct,
        "kib_per_socket": (rss_after - rss_before) / count,
        # µs of server CPU per idle socket per second: heartbeats and the library's housekeeping.
        "idle_cpu_us_per_socket_s": idle_cpu / idle_seconds / count * 1e6 if idle_seconds else None,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "lost": check["lost"],
        "duplicated": check["duplicated"],
        "misdelivered": check["misdelivered"],
        "rest_failures": fleet.rest_failures,
        "offset_faults": fleet.offset_faults(),
    }


async def instances(fleet: Fleet, p: Params) -> Metrics:
    """W5: users held by instance 0 only, each also alone in a room of its own; REST emits on
    instance 0 alternate between a user and a room; CPU of every instance."""
    users = [fleet.user("w5", i) for i in range(p["users"])]
    await fleet.open([(0, u) for u in users])
    first = len(fleet.sockets) - len(users)
    for i, user in enumerate(users):
        answer = await fleet.sockets[first + i].call("join", {"room": f"public:{user}"}, WAIT)
        if not (isinstance(answer, dict) and answer.get("ok")):
            raise RuntimeError(f"socket {i} could not join its room: {answer!r}")

    async def load(deliveries: Deliveries, seconds: float) -> None:
        async def send(seq: int) -> None:
            u = seq % len(users)
            sent_at = time.monotonic()
            deliveries.expect(seq, (first + u,), sent_at)
            path = f"/api/emit/users/{users[u]}" if seq % 2 else f"/api/emit/rooms/public:{users[u]}"
            await fleet.rest_emit(0, path, "dm", {"s": seq, "t": sent_at})

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
            "max_other_cpu_ms_per_1k_emits": (
                max(others) * 1000 / deliveries.emits * 1000 if others else math.nan
            ),
            # What the whole fleet pays, beyond the holder, for users it does not hold.
            "others_cpu_ms_per_1k_emits_sum": sum(others) * 1000 / deliveries.emits * 1000,
        }
    )
    return metrics


async def room_fanout(fleet: Fleet, p: Params) -> Metrics:
    """W6: `rooms` rooms of `members` sockets each, every room's members split across A and B;
    REST emits to rooms, alternating A and B. Each socket joins its room with the `join` event."""
    members = p["members"]
    rooms = [f"public:{fleet.user('w6', r)}" for r in range(p["rooms"])]
    await fleet.open([(i % 2, fleet.user("w6m", i)) for i in range(len(rooms) * members)])
    first = len(fleet.sockets) - len(rooms) * members
    gate = asyncio.Semaphore(100)

    async def join(i: int) -> None:
        async with gate:
            answer = await fleet.sockets[first + i].call("join", {"room": rooms[i // members]}, WAIT)
        if not (isinstance(answer, dict) and answer.get("ok")):
            raise RuntimeError(f"socket {i} could not join its room: {answer!r}")

    await asyncio.gather(*(join(i) for i in range(len(rooms) * members)))
    await asyncio.sleep(SETTLE)

    async def emit(deliveries: Deliveries, seq: int) -> None:
        r = seq % len(rooms)
        sent_at = time.monotonic()
        deliveries.expect(seq, range(first + r * members, first + (r + 1) * members), sent_at)
        await fleet.rest_emit(seq % 2, f"/api/emit/rooms/{rooms[r]}", "news", {"s": seq, "t": sent_at})

    metrics, _, cpu, _ = await _measure(fleet, _closed(emit, p["window"]), p)
    _server_cost(metrics, cpu)
    return metrics


WORKLOADS: dict[str, Callable[[Fleet, Params], Awaitable[Metrics]]] = {
    "w1": user_fanout,
    "w1b": user_fanout,
    "w2": broadcast,
    "w3": gateway,
    "w3f": gateway_fanout,
    "w4": connections,
    "w5": instances,
    "w6": room_fanout,
}

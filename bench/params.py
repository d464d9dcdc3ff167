"""Workload sizes: the full suite (about 8 minutes per repetition on 2 cores) and the CI smoke run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# W2's bar: a rate is sustained when p99 stays under this and the servers keep up with what is offered.
P99_LIMIT_MS = 50.0
KEEP_UP = 0.95  # achieved deliveries/s at least this share of the offered ones
# The load generator is one Python process: at this share of a core where a sweep stops, it (not
# the server) set the limit, and the sustained rate is only a lower bound.
LOADGEN_BOUND_PCT = 90.0
DRAIN = 10.0  # longest wait for the last deliveries of a phase after its load stops, in seconds


@dataclass(frozen=True)
class Workload:
    key: str  # the load generator's name for it
    title: str
    params: dict[str, Any]
    instances: int = 2
    # Sockets opt in to connection state recovery: our app only (the baseline has none), judged
    # against the same workload with recovery off, run next to it in every repetition.
    recover: bool = False

    @property
    def label(self) -> str:
        if self.recover:
            return f"{self.title}, recovery on"
        return f"{self.title} n={self.instances}" if self.key == "w5" else self.title

    @property
    def apps(self) -> tuple[str, ...]:
        return ("ours",) if self.recover else ("ours", "baseline")

    @property
    def group(self) -> tuple[str, int]:
        """Workloads of one group run back to back, their order reversed every other repetition:
        a workload with recovery on and its sibling with recovery off share a group."""
        return self.key, self.instances

    @property
    def timeout(self) -> float:
        """Bound of one load-generator run: the load itself plus generous set-up and drain.

        A sweep repeats warm-up and measurement per rate; only its last, failing step should
        need long drains.
        """
        p = self.params
        steps = [step_seconds(p, rate) for rate in p.get("rates", ())] or [p.get("seconds", 0)]
        load = sum(steps) + len(steps) * p.get("warmup", 0) + p.get("half_seconds", 0) + p.get("one_seconds", 0)
        return float(load + 2 * DRAIN + 60)


def step_seconds(p: dict[str, Any], rate: float) -> float:
    """Length of one sweep step: a p99 over a handful of broadcasts would be one broadcast's tail."""
    return max(float(p["seconds"]), float(p.get("min_emits", 0)) / rate)


def _suite(
    w1: dict[str, Any],
    w2: dict[str, Any],
    w3: dict[str, Any],
    w3f: dict[str, Any],
    w4: dict[str, Any],
    w5: dict[str, Any],
    w6: dict[str, Any],
    sizes: tuple[int, ...],
) -> list[Workload]:
    # W4 first: it reads memory of a fresh instance, before other loads grew its heap.
    # W1 and W2 also run with recovery on (ours only), right after their recovery-off runs.
    return [
        Workload("w4", "W4 connections", w4),
        Workload("w1", "W1 user fan-out", w1),
        Workload("w1", "W1 user fan-out", {**w1, "recover": True}, recover=True),
        Workload("w1b", "W1b user fan-out, 100 users per call", {**w1, "per_call": 100, "window": 4}),
        Workload("w2", "W2 broadcast", w2),
        Workload("w2", "W2 broadcast", {**w2, "recover": True}, recover=True),
        Workload("w3", "W3 gateway", w3),
        Workload("w3f", "W3f gateway, 1 sender to 10 receivers", w3f),
        Workload("w6", "W6 room fan-out", w6),
        *(Workload("w5", "W5 instances", w5, instances=n) for n in sizes),
    ]


# W2 `rates` are emits/s, ascending; the sweep stops at the first rate that fails (P99_LIMIT_MS,
# KEEP_UP, or any fault); a step lasts `seconds`, longer if needed for `min_emits` broadcasts.
# W1 and W3 add `half_seconds` of open loop at half their closed-loop emits/s: 20 s, so that a
# p99 there rests on thousands of emits, not on one hiccup.
FULL = _suite(
    w1={"users": 100, "window": 64, "seconds": 6, "warmup": 1, "half_seconds": 20},
    w2={
        "sockets": 1000,
        "rates": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96],
        "seconds": 3,
        "min_emits": 8,
        "warmup": 0.5,
    },
    w3={"users": 160, "seconds": 6, "warmup": 1, "half_seconds": 20},
    # The yardstick: one user's socket on A, its 10 sockets on B, 32 emits in flight.
    w3f={"receivers": 10, "window": 32, "seconds": 6, "warmup": 1, "half_seconds": 20, "one_seconds": 5},
    # idle_seconds: the servers' ping interval (both apps keep the library's 25 s).
    w4={"sockets": 1000, "concurrency": 50, "idle_seconds": 25},
    w5={"users": 50, "rate": 200, "seconds": 5, "warmup": 1},
    w6={"rooms": 1000, "members": 10, "window": 32, "seconds": 6, "warmup": 1},
    sizes=(2, 4, 8),
)

QUICK = _suite(
    w1={"users": 5, "window": 4, "seconds": 1, "warmup": 0.2, "half_seconds": 0.5},
    w2={"sockets": 20, "rates": [5, 10], "seconds": 0.5, "warmup": 0.1},
    w3={"users": 4, "seconds": 1, "warmup": 0.2, "half_seconds": 0.5},
    w3f={"receivers": 3, "window": 4, "seconds": 1, "warmup": 0.2, "half_seconds": 0.5, "one_seconds": 0.5},
    w4={"sockets": 30, "concurrency": 10, "idle_seconds": 0.5},
    w5={"users": 5, "rate": 20, "seconds": 1, "warmup": 0.2},
    w6={"rooms": 4, "members": 3, "window": 4, "seconds": 1, "warmup": 0.2},
    sizes=(2, 4, 8),
)

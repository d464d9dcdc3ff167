"""Workload sizes: the full suite (about 2 minutes per repetition on 2 cores) and the CI smoke run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Workload:
    key: str  # the load generator's name for it
    title: str
    params: dict[str, Any]
    instances: int = 2

    @property
    def label(self) -> str:
        return f"{self.title} n={self.instances}" if self.key == "w5" else self.title

    @property
    def timeout(self) -> float:
        """Bound of one load-generator run: the load itself plus generous set-up and drain."""
        return float(self.params.get("seconds", 0) + self.params.get("warmup", 0) + 60)


def _suite(
    w1: dict[str, Any],
    w2: dict[str, Any],
    w3: dict[str, Any],
    w4: dict[str, Any],
    w5: dict[str, Any],
    sizes: tuple[int, ...],
) -> list[Workload]:
    # W4 first: it reads memory of a fresh instance, before other loads grew its heap.
    return [
        Workload("w4", "W4 connections", w4),
        Workload("w1", "W1 user fan-out", w1),
        Workload("w2", "W2 broadcast", w2),
        Workload("w3", "W3 gateway", w3),
        *(Workload("w5", "W5 instances", w5, instances=n) for n in sizes),
    ]


FULL = _suite(
    w1={"users": 100, "window": 32, "seconds": 6, "warmup": 1},
    w2={"sockets": 400, "rate": 20, "seconds": 6, "warmup": 1},
    w3={"users": 16, "seconds": 6, "warmup": 1},
    w4={"sockets": 1000, "concurrency": 50},
    w5={"users": 50, "rate": 200, "seconds": 5, "warmup": 1},
    sizes=(2, 4, 8),
)

QUICK = _suite(
    w1={"users": 5, "window": 4, "seconds": 1, "warmup": 0.2},
    w2={"sockets": 20, "rate": 10, "seconds": 1, "warmup": 0.2},
    w3={"users": 4, "seconds": 1, "warmup": 0.2},
    w4={"sockets": 30, "concurrency": 10},
    w5={"users": 5, "rate": 20, "seconds": 1, "warmup": 0.2},
    sizes=(2, 4, 8),
)

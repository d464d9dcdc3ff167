"""Bookkeeping of expected and received deliveries: latency, losses, duplicates."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence; NaN when it is empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class _Emit:
    recipients: Collection[int]
    sent_at: float
    missing: int
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Deliveries:
    """Tracks every emit (a sequence number) and which sockets must receive it, exactly once.

    Latency is measured from the send timestamp the payload carries; only sockets in
    `measured` (all when None) contribute latencies, e.g. the far socket of a gateway test.
    An event sent before this tracker existed belongs to an earlier phase whose drain gave up on
    it (it was counted lost there): it is counted as `late`, not mistaken for one of ours.
    """

    def __init__(self, measured: Collection[int] | None = None) -> None:
        self._emits: dict[int, _Emit] = {}
        self._got: dict[tuple[int, int], int] = {}
        self._measured = measured
        self.latencies: list[float] = []
        self.delivered = 0
        self.duplicated = 0
        self.misdelivered = 0
        self.late = 0
        self._since = time.monotonic()
        self.first_sent: float | None = None
        self.last_received: float | None = None
        self._all_done = asyncio.Event()
        self._open = 0

    def expect(self, seq: int, recipients: Collection[int], sent_at: float) -> None:
        self._emits[seq] = _Emit(recipients, sent_at, len(recipients))
        self._open += 1
        self._all_done.clear()
        if self.first_sent is None:
            self.first_sent = sent_at

    def on_event(self, index: int, event: str, data: Any, received_at: float) -> None:
        """The wire client's event handler: payloads are {"s": seq, "t": send time}."""
        if not isinstance(data, dict) or "s" not in data:
            return  # not ours (e.g. a server notice)
        if data.get("t", self._since) < self._since:
            self.late += 1
            return
        seq = data["s"]
        emit = self._emits.get(seq)
        if emit is None or index not in emit.recipients:
            self.misdelivered += 1
            return
        key = (seq, index)
        count = self._got.get(key, 0) + 1
        self._got[key] = count
        self.last_received = received_at
        if count > 1:
            self.duplicated += 1
            return
        self.delivered += 1
        if self._measured is None or index in self._measured:
            self.latencies.append(received_at - data["t"])
        emit.missing -= 1
        if emit.missing == 0:
            emit.done.set()
            self._open -= 1
            if self._open == 0:
                self._all_done.set()

    async def wait(self, seq: int, timeout: float) -> bool:
        """Wait until every recipient of `seq` has it; False on timeout."""
        emit = self._emits[seq]
        return emit.missing <= 0 or await _set_within(emit.done, timeout)

    async def drain(self, timeout: float) -> bool:
        """Wait until every expected delivery arrived; False on timeout."""
        return self._open == 0 or await _set_within(self._all_done, timeout)

    @property
    def emits(self) -> int:
        return len(self._emits)

    @property
    def expected(self) -> int:
        return sum(len(emit.recipients) for emit in self._emits.values())

    def summary(self) -> dict[str, Any]:
        """Throughput, latency percentiles (ms), and the correctness counts."""
        delivered = self.delivered
        ordered = sorted(self.latencies)
        elapsed = (
            self.last_received - self.first_sent
            if self.first_sent is not None and self.last_received is not None
            else math.nan
        )
        return {
            "emits": self.emits,
            "deliveries": delivered,
            "deliveries_per_s": delivered / elapsed if elapsed and elapsed > 0 else math.nan,
            "emits_per_s": self.emits / elapsed if elapsed and elapsed > 0 else math.nan,
            "p50_ms": percentile(ordered, 50) * 1000,
            "p99_ms": percentile(ordered, 99) * 1000,
            "max_ms": (ordered[-1] * 1000) if ordered else math.nan,
            "lost": self.expected - delivered,
            "duplicated": self.duplicated,
            "misdelivered": self.misdelivered,
            "late": self.late,
        }


async def _set_within(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` gets set within `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False

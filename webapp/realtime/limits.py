"""Per-socket token buckets: a socket that emits too fast is throttled, not its neighbours."""

from __future__ import annotations

import time


class RateLimiter:
    """`rate` events per second with bursts of up to `burst`, counted per socket."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self.refused = 0

    def allow(self, sid: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.get(sid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[sid] = (tokens, now)
            self.refused += 1
            return False
        self._buckets[sid] = (tokens - 1.0, now)
        return True

    def forget(self, sid: str) -> None:
        self._buckets.pop(sid, None)

    def __len__(self) -> int:
        return len(self._buckets)

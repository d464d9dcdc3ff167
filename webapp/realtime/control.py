"""Ending sockets whose token expired, after a warning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

EXPIRY_NOTICE = 30.0  # seconds of warning (`token_expiring`) before an expired token's socket is closed


class ExpiryWatch:
    """Warns a socket `EXPIRY_NOTICE` seconds before its token expires, then ends it."""

    def __init__(
        self, warn: Callable[[str, int], None], end: Callable[[str], None], notice: float = EXPIRY_NOTICE
    ) -> None:
        self._warn = warn
        self._end = end
        self._notice = notice
        self._timers: dict[str, list[asyncio.TimerHandle]] = {}

    def watch(self, sid: str, expires_at: int) -> None:
        loop = asyncio.get_running_loop()
        left = expires_at - time.time()
        timers = [loop.call_later(max(0.0, left), self._expired, sid)]
        if left > self._notice:
            timers.append(loop.call_later(left - self._notice, self._warn, sid, expires_at))
        else:
            self._warn(sid, expires_at)
        self._timers[sid] = timers

    def forget(self, sid: str) -> None:
        for timer in self._timers.pop(sid, ()):
            timer.cancel()

    def _expired(self, sid: str) -> None:
        self._timers.pop(sid, None)
        self._end(sid)

    def __len__(self) -> int:
        return len(self._timers)


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).isoformat().replace("+00:00", "Z")

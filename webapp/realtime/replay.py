"""What a reconnecting subscriber needs to catch up on Redis pub/sub without duplicates.

Pub/sub forgets: a message published while an instance's subscriber is reconnecting (for
example right after Redis restarts) reaches nobody on that instance. So every publish also
appends to a capped stream, and after each reconnect the subscriber replays the stream from
just before it lost contact, skipping what it had already delivered.
"""

from __future__ import annotations

import time
from collections import deque


class RecentMessages:
    """Remembers the messages delivered during the last `keep` seconds of traffic.

    Age is measured against the newest delivery, not the clock: during an outage nothing is
    forgotten, so the replay after it can still recognise what came just before.
    """

    def __init__(self, keep: float) -> None:
        self._keep = keep
        self._order: deque[tuple[float, int]] = deque()
        self._counts: dict[int, int] = {}

    def add(self, message: bytes, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = hash(message)
        self._order.append((now, key))
        self._counts[key] = self._counts.get(key, 0) + 1
        horizon = now - self._keep
        while self._order[0][0] < horizon:
            _, old = self._order.popleft()
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]

    def __contains__(self, message: object) -> bool:
        return isinstance(message, bytes) and hash(message) in self._counts

    def __len__(self) -> int:
        return len(self._order)


def stream_id_at(wall_time: float) -> str:
    """The smallest Redis stream id at a wall-clock time (ids are milliseconds-sequence)."""
    return f"{max(0, int(wall_time * 1000))}-0"

"""A single-instance bus: published messages reach only this process, with a bounded history."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Collection
from typing import Any

from .base import (
    ZERO,
    BusUnavailable,
    Entry,
    GapHandler,
    History,
    Mark,
    MessageHandler,
    Offset,
    Position,
    cancel,
    dispatch,
)


class MemoryBus:
    """Delivers in publish order and keeps the last `history_max` messages (and at most
    `history_age` seconds of them), so clients of this one instance can recover too."""

    kind = "memory"

    def __init__(self, history_max: int = 10_000, history_age: float = 300.0) -> None:
        self._channels: set[str] = set()
        # Every entry, with whether it is ours: the position advances past the others too.
        self._queue: asyncio.Queue[tuple[Entry, bool]] = asyncio.Queue()
        self._handler: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._history: deque[Entry] = deque()
        self._history_max = history_max
        self._history_age = history_age
        self._last = ZERO
        self._trimmed = ZERO  # the newest offset dropped from the history
        self._position: Offset | None = None
        self._advanced = asyncio.Event()
        self._epoch = uuid.uuid4().hex
        self._records: dict[str, tuple[float, bytes]] = {}
        self._expiring: deque[tuple[float, str]] = deque()  # in the order written: same ttl each time
        self._hashes: dict[str, dict[str, str]] = {}

    async def start(self, handler: MessageHandler, on_gap: GapHandler) -> None:
        self._handler = handler
        self._position = self._last
        self._task = asyncio.create_task(self._consume(), name="memory-bus-consumer")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None
        self._advanced.set()  # a sync waiting for the consumer stops waiting

    async def publish(self, channel: str, message: bytes) -> Mark:
        if self._task is None:
            raise BusUnavailable("the in-memory bus is not running")
        entry = Entry(Mark(0, self._next_offset()), channel, message)
        if self._history_max:
            self._history.append(entry)
            self._trim(entry.mark.offset)
        # like Redis: who gets it is decided at publish time
        self._queue.put_nowait((entry, channel in self._channels))
        return entry.mark

    async def sync(self) -> Position:
        """The position once everything published until now has been consumed."""
        target = self._last
        while self.ready and (self._position or ZERO) < target:
            self._advanced.clear()
            await self._advanced.wait()
        return Position({0: self._position or ZERO})

    def _next_offset(self) -> Offset:
        ms = int(time.time() * 1000)
        self._last = Offset(ms, 0) if ms > self._last.ms else Offset(self._last.ms, self._last.seq + 1)
        return self._last

    def _trim(self, newest: Offset) -> None:
        horizon = newest.ms - int(self._history_age * 1000)
        while self._history and (len(self._history) > self._history_max or self._history[0].mark.offset.ms < horizon):
            self._trimmed = self._history.popleft().mark.offset

    async def subscribe(self, channel: str) -> bool:
        self._channels.add(channel)
        return True

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def unreachable_shards(self) -> list[str]:
        return []  # one process, no shards

    @property
    def partitions(self) -> int:
        return 1

    def partition_of(self, channel: str) -> int:
        return 0

    @property
    def position(self) -> Position | None:
        return None if self._position is None else Position({0: self._position})

    @property
    def epoch(self) -> str | None:
        return self._epoch

    def clock_ms(self) -> int:
        """The clock offsets are numbered by: this process's own."""
        return int(time.time() * 1000)

    async def end(self, partitions: Collection[int] | None = None) -> Position:
        return Position({0: self._last})

    async def history(self, after: Position, channels: Collection[str]) -> History:
        wanted, since = set(channels), after.at(0)
        entries = [e for e in self._history if e.mark.offset > since and e.channel in wanted]
        return History(entries, Position({0: max(since, self._last)}), complete=self._trimmed <= since)

    async def remember(self, key: str, value: bytes, ttl: float) -> None:
        now = time.monotonic()
        while self._expiring and self._expiring[0][0] <= now:  # forget what expired: no growth past the ttl
            expires, old = self._expiring.popleft()
            if self._records.get(old, (None,))[0] == expires:
                del self._records[old]
        self._records[key] = (now + ttl, value)
        self._expiring.append((now + ttl, key))

    async def recall(self, key: str) -> bytes | None:
        expires, value = self._records.get(key, (0.0, b""))
        return value if expires > time.monotonic() else None

    async def set_field(self, key: str, field: str, value: str) -> bool:
        """Set a field of the hash at `key`; True when the field is new."""
        fields = self._hashes.setdefault(key, {})
        new = field not in fields
        fields[field] = value
        return new

    async def delete_field(self, key: str, field: str) -> bool:
        """Delete a field of the hash at `key`; True when it was there."""
        fields = self._hashes.get(key, {})
        removed = fields.pop(field, None) is not None
        if not fields:
            self._hashes.pop(key, None)
        return removed

    async def fields(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {}))

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "connected": self.ready, "channels": len(self._channels)}

    async def _consume(self) -> None:
        assert self._handler is not None
        while True:
            entry, ours = await self._queue.get()
            if ours:
                await dispatch(self._handler, entry.channel, entry.message, entry.mark)
            self._position = entry.mark.offset
            self._advanced.set()

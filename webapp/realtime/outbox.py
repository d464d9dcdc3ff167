"""A bounded queue of gateway answers waiting for the bus to come back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from .bus import Bus, BusUnavailable

log = logging.getLogger(__name__)


class Outbox:
    """Publishes in order; while the bus is down, holds messages up to a size and an age.

    Once anything is waiting, later messages queue behind it, so a user's other sockets
    still see answers in the order they were given.
    """

    def __init__(self, bus: Bus, max_messages: int, max_age: float, retry_every: float = 0.2) -> None:
        self._bus = bus
        self._max_messages = max_messages
        self._max_age = max_age
        self._retry_every = retry_every
        self._waiting: deque[tuple[float, str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.retried = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="outbox-flusher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._waiting:
            self.dropped += len(self._waiting)
            log.warning("outbox closed with %d undelivered messages", len(self._waiting))
            self._waiting.clear()

    def __len__(self) -> int:
        return len(self._waiting)

    async def publish(self, channel: str, message: bytes) -> bool:
        """Publish now, or keep for later; False when it had to be dropped."""
        if not self._waiting:
            try:
                await self._bus.publish(channel, message)
                return True
            except BusUnavailable as exc:
                log.warning("bus unavailable, keeping a message for %s in the outbox: %s", channel, exc)
        if len(self._waiting) >= self._max_messages:
            self.dropped += 1
            return False
        self._waiting.append((time.monotonic(), channel, message))
        self._wake.set()
        return True

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                self._expire()
                if not self._waiting:
                    break
                _, channel, message = self._waiting[0]
                try:
                    await self._bus.publish(channel, message)
                except BusUnavailable:
                    await asyncio.sleep(self._retry_every)
                    continue
                self._waiting.popleft()
                self.retried += 1

    def _expire(self) -> None:
        deadline = time.monotonic() - self._max_age
        while self._waiting and self._waiting[0][0] < deadline:
            self._waiting.popleft()
            self.dropped += 1

    def status(self) -> dict[str, Any]:
        return {"waiting": len(self._waiting), "delivered_late": self.retried, "dropped": self.dropped}

"""What every bus offers: channels, a history with offsets, and a small key-value and hash memory.

Offsets are positions in one totally ordered history of everything published under the
prefix (a Redis Stream's entry ids, or a counter in memory). An instance resumes from the last
offset it consumed; a client resumes from the last offset it received.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

_OFFSET_RE = re.compile(r"^(\d{1,15})-(\d{1,15})$")


class Offset(NamedTuple):
    """A position in the history: a Redis stream id `<ms>-<seq>`, ordered as a tuple."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    @classmethod
    def parse(cls, text: object) -> Offset | None:
        """The offset a string names, or None for anything else (clients send these back)."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not isinstance(text, str):
            return None
        match = _OFFSET_RE.match(text)
        return cls(int(match[1]), int(match[2])) if match else None


ZERO = Offset(0, 0)

# channel, raw message, and its offset (None for a message published outside the history).
MessageHandler = Callable[[str, bytes, "Offset | None"], Awaitable[None]]
# Called with a reason when the bus knows it missed messages it can no longer replay.
GapHandler = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Entry:
    offset: Offset
    channel: str
    message: bytes


@dataclass(frozen=True)
class History:
    """What was published after an offset on some channels, and whether that is all of it."""

    entries: list[Entry]
    end: Offset  # the last offset read, whatever its channel (the reader is caught up to here)
    complete: bool  # False when something after the offset was trimmed before it could be read


class BusUnavailable(RuntimeError):
    """The bus did not confirm the operation (it may or may not have taken effect)."""


class Bus(Protocol):
    kind: str

    async def start(self, handler: MessageHandler, on_gap: GapHandler) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, channel: str, message: bytes) -> Offset | None: ...
    async def sync(self) -> Offset: ...
    async def subscribe(self, channel: str) -> bool: ...
    async def unsubscribe(self, channel: str) -> None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def unreachable_shards(self) -> list[str]: ...
    @property
    def position(self) -> Offset | None: ...
    @property
    def epoch(self) -> str | None: ...
    async def end(self) -> Offset: ...
    async def history(self, after: Offset, channels: Collection[str]) -> History: ...
    async def remember(self, key: str, value: bytes, ttl: float) -> None: ...
    async def recall(self, key: str) -> bytes | None: ...
    async def set_field(self, key: str, field: str, value: str) -> bool: ...
    async def delete_field(self, key: str, field: str) -> bool: ...
    async def fields(self, key: str) -> dict[str, str]: ...
    def status(self) -> dict[str, Any]: ...


async def dispatch(handler: MessageHandler, channel: str, message: bytes, offset: Offset | None) -> None:
    """Run the handler for one message; a bug in it must not stop consumption."""
    try:
        await handler(channel, message, offset)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler failed for a message on %s; consumption goes on", channel)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

"""What every bus offers: channels, a history with offsets, and a small key-value and hash memory.

Every channel belongs to one partition, and each partition keeps one totally ordered history
(a Redis Stream whose entry ids are the offsets, or a counter in memory). One Redis node has a
single partition; a Redis Cluster has several, spread over its shards, so that no one shard
records every event. A reader's place is a `Position`: an offset per partition. An instance
resumes from the position it consumed; a client from the position it was sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
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
_MARK_RE = re.compile(r"^(\d{1,4}):(\d{1,15}-\d{1,15})$")


class Mark(NamedTuple):
    """Where one message sits: its partition, and its offset in that partition's history."""

    partition: int
    offset: Offset


class Position:
    """An offset per partition: everything at or before it has been read (or predates the
    reader). A partition it does not name is one it knows nothing of."""

    __slots__ = ("_at",)

    def __init__(self, offsets: Mapping[int, Offset] | None = None) -> None:
        self._at: dict[int, Offset] = dict(offsets or {})

    def get(self, partition: int) -> Offset | None:
        return self._at.get(partition)

    def at(self, partition: int) -> Offset:
        return self._at.get(partition, ZERO)

    def partitions(self) -> list[int]:
        return sorted(self._at)

    def covers(self, mark: Mark) -> bool:
        """Whether the message at `mark` is at or before this position."""
        return mark.offset <= self._at.get(mark.partition, ZERO)

    def advance(self, mark: Mark) -> bool:
        """Move to `mark` if it is ahead (in place); True when it was."""
        if mark.offset > self._at.get(mark.partition, ZERO):
            self._at[mark.partition] = mark.offset
            return True
        return False

    def merged(self, other: Position) -> Position:
        """The later of the two offsets for every partition either names."""
        merged = Position(self._at)
        for partition, offset in other._at.items():
            merged.advance(Mark(partition, offset))
        return merged

    def only(self, partitions: Iterable[int]) -> Position:
        return Position({p: self._at[p] for p in partitions if p in self._at})

    def copy(self) -> Position:
        return Position(self._at)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Position) and self._at == other._at

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._at.items())))

    def __repr__(self) -> str:
        return f"Position({self})"

    def __str__(self) -> str:
        """What a client holds: `<ms>-<seq>` for one partition (partition 0, as one Redis node
        has), else `<partition>:<ms>-<seq>` per partition, comma-separated."""
        if self._at.keys() == {0}:
            return str(self._at[0])
        return ",".join(f"{p}:{self._at[p]}" for p in sorted(self._at))

    @classmethod
    def parse(cls, text: object, partitions: int) -> Position | None:
        """The position a client sent back, or None for anything else (naming a partition
        that does not exist, or one twice, included)."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not isinstance(text, str) or not text:
            return None
        single = Offset.parse(text)
        if single is not None:
            return cls({0: single}) if partitions >= 1 else None
        found: dict[int, Offset] = {}
        parts = text.split(",")
        if len(parts) > partitions:
            return None
        for part in parts:
            match = _MARK_RE.match(part)
            offset = Offset.parse(match[2]) if match else None
            if match is None or offset is None or int(match[1]) >= partitions or int(match[1]) in found:
                return None
            found[int(match[1])] = offset
        return cls(found)


# channel, raw message, and where it sits (None for a message published outside the history).
MessageHandler = Callable[[str, bytes, "Mark | None"], Awaitable[None]]
# Called with a reason when the bus knows it missed messages it can no longer replay.
GapHandler = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Entry:
    mark: Mark
    channel: str
    message: bytes


@dataclass(frozen=True)
class History:
    """What was published after a position on some channels, and whether that is all of it."""

    entries: list[Entry]  # in order within each partition
    end: Position  # the last offsets read, whatever their channel (the reader is caught up to here)
    complete: bool  # False when something after the position was trimmed before it could be read
    more: bool = False  # read up to a limit: some partition may hold more after `end`


class BusUnavailable(RuntimeError):
    """The bus did not confirm the operation (it may or may not have taken effect)."""


class Bus(Protocol):
    kind: str

    async def start(self, handler: MessageHandler, on_gap: GapHandler) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, channel: str, message: bytes) -> Mark | None: ...
    async def sync(self) -> Position: ...
    async def subscribe(self, channel: str) -> bool: ...
    async def unsubscribe(self, channel: str) -> None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def unreachable_shards(self) -> list[str]: ...
    @property
    def partitions(self) -> int: ...
    def partition_of(self, channel: str) -> int: ...
    @property
    def position(self) -> Position | None: ...
    @property
    def epoch(self) -> str | None: ...
    async def end(self, partitions: Collection[int] | None = None) -> Position: ...
    def clock_ms(self) -> int: ...
    async def history(self, after: Position, channels: Collection[str]) -> History: ...
    async def remember(self, key: str, value: bytes, ttl: float) -> None: ...
    async def recall(self, key: str) -> bytes | None: ...
    async def set_field(self, key: str, field: str, value: str) -> bool: ...
    async def delete_field(self, key: str, field: str) -> bool: ...
    async def fields(self, key: str) -> dict[str, str]: ...
    def status(self) -> dict[str, Any]: ...


async def dispatch(handler: MessageHandler, channel: str, message: bytes, mark: Mark | None) -> None:
    """Run the handler for one message; a bug in it must not stop consumption."""
    try:
        await handler(channel, message, mark)
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

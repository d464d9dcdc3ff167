"""The demo page's gateways: an echo and a counted stream, each answer seen by every tab of the user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..realtime import Realtime
from ..realtime.gateway import GatewayError


def register(realtime: Realtime) -> None:
    """Add the demo's gateways to `realtime` (the core registers none of its own)."""

    @realtime.gateway("events")
    async def events(sid: str, data: Any) -> list[Any]:
        """Echo the payload back: one answer, seen by all of the user's sockets."""
        return [data]

    @realtime.gateway("stream")
    async def stream(sid: str, data: Any) -> Iterator[dict[str, int]]:
        """Answer 1..count as separate answers, like the original's stream of 1, 2, 3."""
        count = _stream_count(data)
        return ({"n": n, "of": count} for n in range(1, count + 1))


def _stream_count(data: Any) -> int:
    count = data.get("count", 3) if isinstance(data, dict) else data if data is not None else 3
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 100:
        raise GatewayError("stream expects {\"count\": 1..100}")
    return count

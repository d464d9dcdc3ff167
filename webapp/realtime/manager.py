"""python-socketio's client manager: its documented seam for servers that work as a fleet."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import socketio


class FleetManager(socketio.AsyncManager):
    """The library's manager, telling the propagator when a socket's CONNECT reply is out.

    python-socketio calls `connect` right after it sent that reply; a socket's missed events
    (recovery) and anything delivered to it during its handshake can only go out after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.on_connected: Callable[[str], Awaitable[None]] | None = None

    async def connect(self, sid: str, namespace: str) -> Any:
        result = await super().connect(sid, namespace)
        if self.on_connected is not None and namespace == "/":
            await self.on_connected(sid)
        return result

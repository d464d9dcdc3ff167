"""A python-socketio client that recovers its session the way socket.io-client v4 does.

    client = RecoveringClient(reconnection=True)
    client.on("dm", on_dm)                      # handlers get the event's data, no offset
    await client.connect(url, auth={"token": token}, transports=["websocket"])
    ...                                          # after a blink: client.recovered is True

It asks for recovery (`recover: true`), keeps the `pid` of the CONNECT reply and the offset of
the last event, and sends both when it reconnects. Missed events then arrive before live ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import socketio

Auth = dict[str, Any] | Callable[[], dict[str, Any]] | Callable[[], Awaitable[dict[str, Any]]] | None


class RecoveringClient(socketio.AsyncClient):
    """`socketio.AsyncClient` with connection state recovery on the default namespace."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pid: str | None = None
        self.offset: str | None = None
        self.recovered = False
        self._base_auth: Auth = None

    async def connect(self, url: str, *args: Any, auth: Auth = None, **kwargs: Any) -> None:
        if auth != self._handshake_auth:  # python-socketio's reconnect passes ours back in
            self._base_auth = auth
        await super().connect(url, *args, auth=self._handshake_auth, **kwargs)

    async def _handshake_auth(self) -> dict[str, Any]:
        base = await self._get_real_value(self._base_auth) or {}
        resume = {"pid": self.pid, **({"offset": self.offset} if self.offset else {})} if self.pid else {}
        return {**base, "recover": True, **resume}

    # python-socketio's private client hooks (listed in webapp/private_hooks.py).
    async def _handle_connect(self, namespace: str | None, data: Any) -> None:
        if (namespace or "/") == "/":
            pid = data.get("pid") if isinstance(data, dict) else None
            self.recovered = pid is not None and pid == self.pid
            self.pid = pid if isinstance(pid, str) else None
        await super()._handle_connect(namespace, data)

    async def _handle_event(self, namespace: str | None, id: Any, data: Any) -> None:
        if self.pid and (namespace or "/") == "/" and len(data) > 1 and isinstance(data[-1], str):
            self.offset, data = data[-1], data[:-1]
        await super()._handle_event(namespace, id, data)

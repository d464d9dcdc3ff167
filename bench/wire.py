"""A lean Socket.IO v5 client speaking the wire protocol over aiohttp's WebSocket.

The load generator shares two cores with the servers, so it does as little as it can per
message: it handles only the Engine.IO open packet, the namespace connect, pings, and
`42["event", data]` messages, with no client-side event machinery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

# Called for every event with (socket index, event name, data, receive time from time.monotonic()).
EventHandler = Callable[[int, str, Any, float], None]


class ConnectRefused(RuntimeError):
    """The server refused the namespace connection (`44{...}`) or the handshake broke."""


class SioSocket:
    """One connected Socket.IO socket; a reader task answers pings and dispatches events."""

    def __init__(self, index: int, ws: aiohttp.ClientWebSocketResponse, sid: str, on_event: EventHandler):
        self.index = index
        self.sid = sid
        self._ws = ws
        self._on_event = on_event
        self._reader = asyncio.create_task(self._read(), name=f"sio-reader-{index}")
        self.closed_by_server = False

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str | None,
        index: int,
        on_event: EventHandler,
        timeout: float = 10.0,
    ) -> SioSocket:
        """Open the WebSocket, read the open packet, connect the default namespace with auth."""
        url = base_url.replace("http://", "ws://", 1) + "/socket.io/?EIO=4&transport=websocket"
        ws = await session.ws_connect(
            url, autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
        )
        try:
            opened = await ws.receive_str(timeout=timeout)
            if not opened.startswith("0"):
                raise ConnectRefused(f"expected an Engine.IO open packet, got {opened[:80]!r}")
            auth = {"token": token} if token is not None else {}
            await ws.send_str("40" + orjson.dumps(auth).decode())
            while True:
                answer = await ws.receive_str(timeout=timeout)
                if answer != "2":
                    break
                await ws.send_str("3")
            if answer.startswith("44"):
                raise ConnectRefused(f"connection refused: {answer[2:200]}")
            if not answer.startswith("40"):
                raise ConnectRefused(f"expected a namespace connect, got {answer[:80]!r}")
            sid = orjson.loads(answer[2:])["sid"]
        except BaseException:
            await ws.close()
            raise
        return cls(index, ws, sid, on_event)

    async def emit(self, event: str, data: Any) -> None:
        await self._ws.send_str("42" + orjson.dumps([event, data]).decode())

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        if not self._ws.closed:
            await self._ws.close()

    async def _read(self) -> None:
        ws, on_event, index = self._ws, self._on_event, self.index
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            text: str = msg.data
            if text.startswith("42"):
                received = time.monotonic()
                event, *args = orjson.loads(text[2:])
                on_event(index, event, args[0] if args else None, received)
            elif text == "2":
                await ws.send_str("3")
            elif text.startswith("41") or text == "1":
                break  # namespace disconnect or Engine.IO close
        self.closed_by_server = True

"""The bench's own WebSocket client (bench/wire.py) against aiohttp's WebSocket server, and its framing."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMessage, WSMsgType, web

from bench.wire import CLOSE_WAIT, ConnectRefused, SioSocket, _WebSocket

from .harness import wait_until

Handler = Callable[[web.WebSocketResponse], Awaitable[object]]
Serve = Callable[[Handler], Awaitable[str]]  # starts a server for a handler, returns its URL
Events = list[tuple[int, str, Any]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    """An aiohttp app whose /socket.io/ WebSocket runs `handler`; 404 anywhere else."""

    async def socket_io(request: web.Request) -> web.StreamResponse:
        assert request.query["EIO"] == "4" and request.query["transport"] == "websocket"
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await handler(ws)
        return ws

    app = web.Application()
    app.router.add_get("/socket.io/", socket_io)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        runner, url = await _serve(handler)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


async def _open(ws: web.WebSocketResponse, expected_auth: dict[str, str]) -> None:
    """The server side of the Socket.IO handshake, with an Engine.IO ping in the middle."""
    await ws.send_str('0{"sid":"eio","upgrades":[],"pingInterval":25000,"pingTimeout":20000}')
    connect = await ws.receive_str()
    assert connect[:2] == "40" and json.loads(connect[2:]) == expected_auth
    await ws.send_str("2")
    assert await ws.receive_str() == "3"
    await ws.send_str('40{"sid":"abc"}')


async def _connect(url: str, events: Events, token: str | None = "t") -> SioSocket:
    def on_event(index: int, event: str, data: Any, received: float) -> None:
        events.append((index, event, data))

    return await SioSocket.connect(None, url, token, 7, on_event, timeout=5.0)


async def test_events_both_ways_at_every_frame_length(serve: Serve) -> None:
    sizes = (10, 1_000, 100_000)  # 7-, 16- and 64-bit lengths

    async def handler(ws: web.WebSocketResponse) -> None:
        await _open(ws, {"token": "t"})
        for size in sizes:
            await ws.send_str("42" + json.dumps(["news", {"x": "y" * size}]))
        await ws.ping(b"are you there")
        for _ in sizes:  # aiohttp's server rejects unmasked client frames: these prove the masks
            await ws.send_str("42" + (await ws.receive_str())[2:])
        closing.append(await ws.receive())

    events: Events = []
    closing: list[WSMessage] = []
    sock = await _connect(await serve(handler), events)
    assert sock.sid == "abc" and sock.index == 7
    for size in sizes:
        await sock.emit("echo", {"z": "w" * size})
    await wait_until(lambda: len(events) == 2 * len(sizes), "every frame size echoed twice", timeout=5)
    assert [len(data["x"]) for _, _, data in events[:3]] == list(sizes)
    assert [(index, event, len(data["z"])) for index, event, data in events[3:]] == [
        (7, "echo", size) for size in sizes
    ]
    async with asyncio.timeout(CLOSE_WAIT / 2):  # the server answered our close frame
        await sock.close()
    assert not sock.closed_by_server
    assert [(msg.type, msg.data) for msg in closing] == [(WSMsgType.CLOSE, 1000)]


async def test_anonymous_sockets_send_empty_auth(serve: Serve) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await _open(ws, {})
        await ws.receive()

    sock = await _connect(await serve(handler), [], token=None)
    await sock.close()
    await sock.close()  # idempotent


async def test_a_refused_namespace_raises(serve: Serve) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.send_str("0{}")
        await ws.receive_str()
        await ws.send_str('44{"message":"no"}')
        await ws.receive()

    with pytest.raises(ConnectRefused, match="no"):
        await _connect(await serve(handler), [])


async def test_no_upgrade_raises(serve: Serve) -> None:
    url = await serve(lambda ws: asyncio.sleep(0))
    with pytest.raises(ConnectRefused, match="404"):
        await _connect(url + "/elsewhere", [])


async def test_the_handshake_honours_its_timeout(serve: Serve) -> None:
    url = await serve(lambda ws: ws.receive())  # never sends the open packet
    with pytest.raises(TimeoutError):
        await SioSocket.connect(None, url, None, 0, lambda *args: None, timeout=0.3)


@pytest.mark.parametrize("goodbye", ["41", "1", "close"])
async def test_the_server_leaving_is_noticed(serve: Serve, goodbye: str) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await _open(ws, {"token": "t"})
        if goodbye == "close":
            await ws.close()
        else:
            await ws.send_str(goodbye)
            await ws.receive()

    sock = await _connect(await serve(handler), [])
    await wait_until(lambda: sock.closed_by_server, "the server-side close", timeout=5)
    await sock.close()  # does not raise once the server left


async def test_fragments_and_control_frames_split_at_every_byte() -> None:
    """A text message in three fragments with a ping between them, fed one byte at a time."""
    received: list[bytes] = []
    transport = _Transport()
    ws = _WebSocket(b"", "", lambda text: received.append(bytes(text)), lambda reason: None)
    ws._transport = transport  # type: ignore[assignment]
    ws._upgraded = True
    stream = (
        _server_frame(0x01, b"42[", fin=False)
        + _server_frame(0x09, b"hi")
        + _server_frame(0x00, b'"e",' + b"1" * 300, fin=False)
        + _server_frame(0x00, b"]")
        + _server_frame(0x01, b"2")
    )
    for i in range(len(stream)):
        ws.data_received(stream[i : i + 1])
    assert received == [b'42["e",' + b"1" * 300 + b"]", b"2"]
    assert transport.frames() == [(0x0A, b"hi")]  # the pong, masked, same payload


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        return struct.pack("!BB", first, size) + payload
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


class _Transport:
    """Collects what the client writes and unmasks it."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass

    def frames(self) -> list[tuple[int, bytes]]:
        out, data, pos = [], self.written, 0
        while pos < len(data):
            first, second = data[pos], data[pos + 1]
            assert first & 0x80 and second & 0x80, "client frames are final and masked"
            size, pos = second & 0x7F, pos + 2
            if size == 126:
                size, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
            elif size == 127:
                size, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
            mask, pos = data[pos : pos + 4], pos + 4
            out.append((first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data[pos : pos + size]))))
            pos += size
        return out

"""Client frames under hypercorn (webapp/realtime/frames.py, FrameStream's reader): the common
frame is read without wsproto, and every other frame still gets wsproto's answer.

The client here writes raw bytes on a TCP connection, so frames can be split, packed together,
fragmented or malformed at will."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from .harness import WAIT, Instance, instance_env, token_for, unique

pytestmark = pytest.mark.cluster

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
CAP = 100_000


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    served = Instance(
        "reading", instance_env(unique("reading"), SOCKET_RATE="1000", SOCKET_BURST="1000", MAX_PAYLOAD_BYTES=str(CAP))
    ).start()
    served.wait_serving()
    yield served
    served.stop(signal.SIGKILL)
    assert "Traceback" not in served.output(), served.output()


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, length_bytes: int | None = None
) -> bytes:
    """A client frame, masked unless told otherwise; `length_bytes` forces a length encoding."""
    size = len(payload)
    encoding = length_bytes if length_bytes is not None else (0 if size < 126 else 2 if size < 1 << 16 else 8)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if encoding == 0:
        head = bytes((first, mask_bit | size))
    elif encoding == 2:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def event(name: str, data: Any) -> bytes:
    return b"42" + json.dumps([name, data]).encode()


class RawFrames:
    """A WebSocket client on a bare TCP connection: it writes whatever bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, base: str, token: str) -> RawFrames:
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        raw = cls(reader, writer)
        opcode, opened = await raw.frame()
        assert (opcode, opened[:1]) == (TEXT, b"0"), opened
        await raw.send(client_frame(TEXT, b"40" + json.dumps({"token": token}).encode()))
        opcode, connected = await raw.frame()
        assert connected.startswith(b"40{"), connected
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame's opcode and payload (server frames are whole and unmasked)."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await asyncio.wait_for(self.reader.readexactly(2), WAIT))
        elif size == 127:
            (size,) = struct.unpack("!Q", await asyncio.wait_for(self.reader.readexactly(8), WAIT))
        return first & 0x0F, await asyncio.wait_for(self.reader.readexactly(size), WAIT)

    async def answer(self) -> list[Any]:
        """The next Socket.IO event's arguments, its name first (server pings answered on the way)."""
        while True:
            opcode, payload = await self.frame()
            assert opcode == TEXT, (opcode, payload)
            if payload == b"2":
                await self.send(client_frame(TEXT, b"3"))
            elif payload.startswith(b"42"):
                return list(json.loads(payload[2:]))

    async def ending(self) -> int | None:
        """How the server ends the connection: its close frame's code, or None when it closes
        the TCP connection without one (skipping what comes before either)."""
        while True:
            try:
                opcode, payload = await self.frame()
            except asyncio.IncompleteReadError:
                return None
            if opcode == CLOSE:
                return int(struct.unpack("!H", payload[:2])[0])

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def reading(instance: Instance) -> dict[str, int]:
    status, body = instance.status()
    assert status == 200, body
    return {key: body["websocket"][key] for key in ("frames_read", "reads_handed_to_wsproto")}


async def test_common_frames_are_read_whole_however_they_are_packed_or_split(instance: Instance) -> None:
    raw = await RawFrames.open(instance.url, await token_for(instance.url, "reader"))
    try:
        before = reading(instance)
        bodies = [{"i": i, "pad": "x" * size} for i, size in enumerate([0, 100, 200, 70_000, 5])]
        # Several frames in one write, every length encoding (7-bit, 16-bit, 64-bit)...
        await raw.send(b"".join(client_frame(TEXT, event("events", body)) for body in bodies[:4]))
        # ... one frame written a byte at a time, and a large one in pieces of 1,000 bytes.
        for byte in client_frame(TEXT, event("events", bodies[4])):
            await raw.send(bytes((byte,)))
        bodies.append({"i": 5, "pad": "y" * 90_000})
        large = client_frame(TEXT, event("events", bodies[5]))
        for piece in range(0, len(large), 1000):
            await raw.send(large[piece : piece + 1000])
        assert [await raw.answer() for _ in bodies] == [["events", body] for body in bodies]
        after = reading(instance)
        assert after["frames_read"] - before["frames_read"] >= len(bodies)
        assert after["reads_handed_to_wsproto"] == before["reads_handed_to_wsproto"]
    finally:
        await raw.close()


async def test_a_ping_between_messages_is_answered_and_the_rest_still_arrives(instance: Instance) -> None:
    raw = await RawFrames.open(instance.url, await token_for(instance.url, "pinger"))
    try:
        before = reading(instance)
        await raw.send(
            client_frame(TEXT, event("events", 1)) + client_frame(PING, b"are you there")
            + client_frame(TEXT, event("events", 2))
        )
        got: list[tuple[int, bytes]] = [await raw.frame() for _ in range(3)]
        # The pong may come before the first answer (control frames may come between messages).
        assert (PONG, b"are you there") in got
        assert [frame for frame in got if frame[0] == TEXT] == [(TEXT, b'42["events",1]'), (TEXT, b'42["events",2]')]
        await raw.send(client_frame(TEXT, event("events", 3)))
        assert await raw.answer() == ["events", 3]
        assert reading(instance)["reads_handed_to_wsproto"] == before["reads_handed_to_wsproto"] + 1
    finally:
        await raw.close()


async def test_a_fragmented_message_is_joined(instance: Instance) -> None:
    raw = await RawFrames.open(instance.url, await token_for(instance.url, "fragments"))
    try:
        message = event("events", {"joined": True})
        await raw.send(
            client_frame(TEXT, message[:7], fin=False) + client_frame(CONTINUATION, message[7:])
            + client_frame(TEXT, event("events", "after"))
        )
        assert await raw.answer() == ["events", {"joined": True}]
        assert await raw.answer() == ["events", "after"]
    finally:
        await raw.close()


# hypercorn's own path (wsproto) ends a connection whose frame it cannot parse without a close
# frame, and refuses a message past the cap with 1009; these checked the same before the reader.
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(TEXT, event("events", 1), masked=False), None),  # clients must mask
        (client_frame(TEXT, event("events", 1), length_bytes=2), None),  # a length not minimally encoded
        (client_frame(TEXT, b'42["events","\xff\xfe"]'), None),  # text that is not UTF-8
        (client_frame(0x40 | TEXT, event("events", 1)), None),  # RSV1 set, no extension negotiated
        (client_frame(TEXT, event("events", "x" * 2 * CAP)), 1009),  # past the cap
    ],
    ids=["unmasked", "long-length", "not-utf8", "reserved-bit", "too-big"],
)
async def test_malformed_frames_end_the_connection_as_wsproto_would(
    instance: Instance, frame: bytes, code: int | None
) -> None:
    raw = await RawFrames.open(instance.url, await token_for(instance.url, "malformed"))
    try:
        await raw.send(frame)
        assert await raw.ending() == code
    finally:
        await raw.close()
    healthy = await RawFrames.open(instance.url, await token_for(instance.url, "after"))
    try:
        await healthy.send(client_frame(TEXT, event("events", "still here")))
        assert await healthy.answer() == ["events", "still here"]
    finally:
        await healthy.close()

"""Ready WebSocket frames (webapp/realtime/frames.py): valid frames, and what clients read."""

from __future__ import annotations

import asyncio

import pytest
import redis
from engineio import packet as eio_packet
from wsproto.frame_protocol import FrameProtocol, Opcode

from webapp.realtime import frames

from .conftest import Cluster, running
from .harness import RawSocket, api, token_for, unique


def _read_as_a_client(data: bytes) -> list[tuple[Opcode, bytes]]:
    """The messages a client's wsproto finds in `data` (it refuses masked or malformed frames)."""
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(data)
    out = []
    for frame in reader.received_frames():
        assert frame.frame_finished and frame.message_finished
        payload = frame.payload  # text arrives decoded (wsproto checks the UTF-8)
        out.append((frame.opcode, payload.encode() if isinstance(payload, str) else bytes(payload)))
    return out


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_a_frame_reads_back_whole_at_every_length_encoding(size: int) -> None:
    text = ("é" * (size // 2) + "x" * (size % 2)).encode()  # multi-byte UTF-8, `size` bytes
    binary = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = frames.frame(text) + frames.frame(binary, 0x2)
    assert _read_as_a_client(data) == [(Opcode.TEXT, text), (Opcode.BINARY, binary)]


def test_a_packets_frame_is_built_once_and_shared() -> None:
    text = eio_packet.Packet(eio_packet.MESSAGE, '2["news",{"a":1}]')
    binary = eio_packet.Packet(eio_packet.MESSAGE, b"\x00\x01")
    assert frames.frame_of(text) is frames.frame_of(text)
    assert _read_as_a_client(frames.frame_of(text) + frames.frame_of(binary)) == [
        (Opcode.TEXT, b'42["news",{"a":1}]'),
        (Opcode.BINARY, b"\x00\x01"),
    ]


@pytest.mark.cluster
async def test_sockets_under_hypercorn_read_every_event_whole_and_in_order(redis_client: redis.Redis) -> None:
    """Served by hypercorn, sockets get ready frames (at most one write per frame), written at
    once when the connection is idle and queued when not; a client that negotiated
    permessage-deflate, as browsers do, reads the uncompressed ones as well."""
    with running(redis_client, Cluster(unique("frames"), ("A",), MAX_PAYLOAD_BYTES="200000")) as fleet:
        base = fleet.a.url
        token = await token_for(base, "framed")
        plain = await RawSocket.open(base, token)
        deflating = await RawSocket.open(base, token, compress=15)
        try:
            assert deflating.ws.compress == 15  # the server took permessage-deflate
            for sock in (plain, deflating):
                assert "sid" in await sock.connected()
            # Small and large events (7-bit, 16-bit and 64-bit frame lengths), one after another.
            sizes = [10, 200, 40_000, 70_000, 5]
            bodies = [{"i": i, "pad": "x" * (sizes[i % len(sizes)] - 20)} for i in range(60)]
            for body in bodies:
                status, answer = await api(base, "/api/emit/users/framed", {"event": "news", "data": body})
                assert status == 202, answer
            for sock in (plain, deflating):
                got = [await sock.event() for _ in bodies]
                assert [args[1] for args in got] == bodies
            status, details = fleet.a.status()
            assert status == 200, details
            written = details["websocket"]
            assert written["ready_frames"] is True
            assert written["frames"] >= 2 * len(bodies) and 0 < written["writes"] <= written["frames"]
            # Idle sockets took frames on the spot (no writer task in between), and the large
            # events, queued behind a busy transport, still arrived in order above.
            assert 0 < written["written_at_once"] <= written["writes"]
        finally:
            await asyncio.gather(plain.close(), deflating.close())

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
            # Both sockets' apps receive from the lean queue, not hypercorn's asyncio.Queue.
            assert written["lean_receive_queues"] >= 2
        finally:
            await asyncio.gather(plain.close(), deflating.close())


@pytest.mark.cluster
async def test_a_burst_to_an_idle_socket_leaves_in_few_writes_and_in_order(redis_client: redis.Redis) -> None:
    """Events that reach an instance together (one batch call: one read from Redis) are
    written to each idle socket once the loop turn ends, together, not one write each; large
    ones that keep the connection's buffer busy reach it in order too, every frame counted."""
    with running(redis_client, Cluster(unique("burst"), ("A",), MAX_PAYLOAD_BYTES="1000000")) as fleet:
        base = fleet.a.url
        sock = await RawSocket.open(base, await token_for(base, "bursty"))
        try:
            assert "sid" in await sock.connected()
            _, before = fleet.a.status()
            events = [{"scope": "user", "user_id": "bursty", "event": "news", "data": {"i": i}} for i in range(50)]
            status, answer = await api(base, "/api/emit/batch", {"events": events})
            assert status == 202, answer
            assert [(await sock.event())[1] for _ in events] == [{"i": i} for i in range(50)]
            _, after = fleet.a.status()
            frames_written = after["websocket"]["frames"] - before["websocket"]["frames"]
            writes = after["websocket"]["writes"] - before["websocket"]["writes"]
            assert frames_written == 50 and 0 < writes < 50, (frames_written, writes)

            large = [{"scope": "user", "user_id": "bursty", "event": "news", "data": {"i": i, "pad": "x" * 50_000}}
                     for i in range(8)]
            status, answer = await api(base, "/api/emit/batch", {"events": large + events})
            assert status == 202, answer
            got = [(await sock.event())[1] for _ in range(len(large) + len(events))]
            assert got == [item["data"] for item in large + events]
            _, last = fleet.a.status()
            assert last["websocket"]["frames"] - after["websocket"]["frames"] == len(large) + len(events)
        finally:
            await sock.close()


@pytest.mark.cluster
async def test_a_replay_past_the_write_batch_size_arrives_whole_and_in_order(redis_client: redis.Redis) -> None:
    """A recovering socket's missed events are delivered in one go; past WRITE_BATCH_BYTES they
    go through the socket's writer (counted against the slow-consumer bound), still in order."""
    with running(redis_client, Cluster(unique("replay"), ("A",), MAX_PAYLOAD_BYTES="200000")) as fleet:
        base = fleet.a.url
        token = await token_for(base, "replayed")
        sock = await RawSocket.open(base, token, auth={"token": token, "recover": True})
        pid = (await sock.connected())["pid"]
        status, answer = await api(base, "/api/emit/users/replayed", {"event": "news", "data": {"i": -1}})
        assert status == 202, answer
        offset = (await sock.event())[-1]
        await sock.close()
        missed = [{"i": i, "pad": "x" * 50_000} for i in range(8)]  # 400 KB
        for data in missed:
            status, answer = await api(base, "/api/emit/users/replayed", {"event": "news", "data": data})
            assert status == 202, answer
        sock = await RawSocket.open(base, token, auth={"token": token, "recover": True, "pid": pid, "offset": offset})
        try:
            assert (await sock.connected())["pid"] == pid
            assert [(await sock.event())[1] for _ in missed] == missed
            assert (await sock.event())[:2] == ["recovered", {"missed": len(missed)}]
        finally:
            await sock.close()

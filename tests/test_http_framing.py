"""REST calls over raw TCP, as HTTP/1.1 clients may frame them: bodies in pieces, bodies past
the limit in pieces, and requests pipelined on one connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from .harness import API_KEY, WAIT, Instance
from .test_polling import serve

LIMIT = 4096  # MAX_PAYLOAD_BYTES of this module's instance


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    yield from serve("framing", MAX_PAYLOAD_BYTES=str(LIMIT))


class Raw:
    """One keep-alive HTTP/1.1 connection, written and read byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, instance: Instance) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", instance.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], Any]:
        async def read() -> tuple[int, dict[str, str], Any]:
            status_line = await self.reader.readuntil(b"\r\n")
            headers: dict[str, str] = {}
            while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers["content-length"]))
            return int(status_line.split()[1]), headers, json.loads(body)

        return await asyncio.wait_for(read(), WAIT)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw(instance: Instance) -> AsyncIterator[Raw]:
    connection = await Raw.open(instance)
    yield connection
    await connection.close()


def post(path: str, body: bytes, *, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    head = b"POST %s HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n%s\r\n\r\n"
    return head % (path.encode(), API_KEY.encode(), framing) + (b"" if chunked else body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_a_body_sent_in_pieces_is_read_whole(raw: Raw) -> None:
    body = json.dumps({"user_id": "pieces", "ttl": 60}).encode()
    await raw.send(post("/api/tokens", b"", chunked=True))
    for start in range(0, len(body), 7):
        await raw.send(chunk(body[start : start + 7]))
        await asyncio.sleep(0.02)  # pace the client: each piece is a read of its own
    await raw.send(b"0\r\n\r\n")
    status, headers, answer = await raw.response()
    assert status == 201 and answer["token"], answer
    assert headers["content-type"] == "application/json"


async def test_a_body_past_the_limit_in_pieces_is_refused_with_413(raw: Raw) -> None:
    await raw.send(post("/api/emit/all", b"", chunked=True))
    piece = b" " * 1024
    for _ in range(LIMIT // len(piece) + 2):
        await raw.send(chunk(piece))
    await raw.send(b"0\r\n\r\n")
    status, _, answer = await raw.response()
    assert status == 413 and answer["error"]["code"] == "payload_too_large", answer


async def test_requests_pipelined_on_one_connection_are_answered_in_order(raw: Raw) -> None:
    calls = [post("/api/tokens", json.dumps({"user_id": f"pipelined{i}"}).encode()) for i in range(3)]
    await raw.send(b"".join([*calls, post("/api/tokens", b"{not json")]))
    answers = [await raw.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [201, 201, 201, 400]
    assert all(answer["token"] for _, _, answer in answers[:3])
    assert answers[3][2]["error"]["code"] == "malformed_json"
    assert len({headers["x-request-id"] for _, headers, _ in answers}) == 4


async def test_a_response_is_one_body_with_its_length(raw: Raw) -> None:
    await raw.send(post("/api/emit/all", json.dumps({"event": "news", "data": 1}).encode()))
    status, headers, answer = await raw.response()
    assert status == 202 and answer["accepted"] is True and answer["scope"] == "all"
    assert "transfer-encoding" not in headers and int(headers["content-length"]) > 0

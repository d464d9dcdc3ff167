"""Heartbeats: a socket that answers pings stays, one that stops is closed and forgotten within
the ping timeout, over WebSocket and over long-polling (pings share timers and the expiry check
sweeps every socket at once: see webapp/realtime/transport.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from itertools import pairwise

import aiohttp
import pytest

from .harness import Instance, RawSocket, instance_env, token_for, unique, wait_until
from .test_polling import Polling

pytestmark = pytest.mark.cluster

PING_INTERVAL = 1
PING_TIMEOUT = 2
# A ping leaves at most one tick (a tenth of the interval here) after it is due, and the expiry
# sweep runs every quarter of the timeout; the rest is room for a loaded test machine.
SLACK = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    env = instance_env(unique("heartbeat"), PING_INTERVAL=str(PING_INTERVAL), PING_TIMEOUT=str(PING_TIMEOUT))
    instance = Instance("heartbeat", env).start()
    instance.wait_serving()
    yield instance
    instance.stop(signal.SIGKILL)
    assert "Traceback" not in instance.output(), instance.output()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


async def test_a_websocket_that_answers_pings_is_pinged_every_interval_and_stays(server: Instance) -> None:
    sock = await RawSocket.open(server.url, await token_for(server.url, "steady"))
    try:
        assert "sid" in await sock.connected()
        pinged_at = []
        while len(pinged_at) < 4:
            text = await sock.ws.receive_str(timeout=PING_INTERVAL + SLACK)
            if text == "2":
                pinged_at.append(time.monotonic())
                await sock.ws.send_str("3")
        gaps = [b - a for a, b in pairwise(pinged_at)]
        assert all(PING_INTERVAL * 0.9 <= gap <= PING_INTERVAL + SLACK for gap in gaps), gaps
        assert server.status()[1]["sockets"] == 1
        await sock.ws.send_str('42["whoami"]')  # still served after several pings
    finally:
        await sock.close()
    await wait_until(lambda: server.status()[1]["sockets"] == 0, "the socket to be forgotten")


async def test_a_websocket_that_stops_answering_pings_is_closed_and_forgotten(server: Instance) -> None:
    sock = await RawSocket.open(server.url, await token_for(server.url, "silent"))
    try:
        assert "sid" in await sock.connected()
        assert server.status()[1]["users"] == 1
        started = time.monotonic()
        received = []
        while True:  # reads, never answers
            message = await sock.ws.receive(timeout=PING_INTERVAL + PING_TIMEOUT + 2 * SLACK)
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            received.append(message.data)
        took = time.monotonic() - started
        # A ping, then the end of the connection. (No Engine.IO CLOSE: python-engineio's send
        # checks the ping deadline first, and a socket past it sends nothing more.)
        assert received == ["2"], received
        assert PING_INTERVAL + PING_TIMEOUT * 0.9 <= took <= PING_INTERVAL + PING_TIMEOUT + 2 * SLACK, took
        await wait_until(lambda: server.status()[1]["users"] == 0, "the silent user to be gone")
        assert server.status()[1]["sockets"] == 0
    finally:
        await sock.close()


async def test_a_polling_session_that_stops_polling_is_closed_and_forgotten(
    server: Instance, http: aiohttp.ClientSession
) -> None:
    session = Polling(http, server.url)
    await session.open()
    assert server.status()[1]["sockets"] == 1
    started = time.monotonic()
    await wait_until(
        lambda: server.status()[1]["sockets"] == 0,
        "the abandoned session to be closed",
        timeout=PING_INTERVAL + PING_TIMEOUT + 2 * SLACK,
    )
    assert time.monotonic() - started >= PING_INTERVAL + PING_TIMEOUT * 0.9
    assert await session.get_status() == 400  # the session is gone, not merely idle

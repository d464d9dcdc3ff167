"""Heartbeats: a socket that answers pings stays, one that stops is closed and forgotten within
the ping timeout, over WebSocket and over long-polling (pings share timers and the expiry check
sweeps every socket at once: see webapp/realtime/transport.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest

from .harness import Instance, Probe, RawSocket, api, token_for, unique, wait_until
from .test_polling import Polling, http, serve  # noqa: F401 - http: the fixture, shared

pytestmark = pytest.mark.cluster

PING_INTERVAL = 1
PING_TIMEOUT = 2
# A ping leaves at most one tick (a tenth of the interval here) after it is due, and the expiry
# sweep runs every quarter of the timeout; the rest is room for a loaded test machine.
SLACK = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    yield from serve("heartbeat", PING_INTERVAL=str(PING_INTERVAL), PING_TIMEOUT=str(PING_TIMEOUT))


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
        # (No lower bound: one ping read late makes the next gap look short.)
        gaps = [b - a for a, b in pairwise(pinged_at)]
        assert all(gap <= PING_INTERVAL + SLACK for gap in gaps), gaps
        assert server.status()[1]["sockets"] == 1
        await sock.ws.send_str('42["whoami"]')  # still served after several pings
    finally:
        await sock.close()
    await wait_until(lambda: server.status()[1]["sockets"] == 0, "the socket to be forgotten")


async def test_polling_and_upgraded_clients_that_answer_pings_stay(server: Instance) -> None:
    """Long-polling sockets and sockets upgraded from it to WebSocket take the library's loops
    but our pings and sweep: python-socketio's client answers, and neither socket is closed."""
    user = unique("steady")
    token = await token_for(server.url, user)
    polling, upgraded = Probe("polling"), Probe("upgraded")
    try:
        await polling.connect(server.url, token, transports=("polling",))
        await upgraded.connect(server.url, token, transports=("polling", "websocket"))
        await upgraded.wait_until(lambda: upgraded.client.transport() == "websocket", "the upgrade")
        # Not a synchronisation: long enough for pings to come and go, and for a socket whose
        # pong went missing to be closed by the sweep.
        await asyncio.sleep(PING_INTERVAL + PING_TIMEOUT + SLACK)
        assert polling.client.connected and upgraded.client.connected
        assert server.status()[1]["sockets"] == 2
        status, answer = await api(server.url, f"/api/emit/users/{user}", {"event": "news", "data": 1})
        assert status == 202, answer
        for probe in (polling, upgraded):
            assert await probe.wait_for("news") == [1], probe.name
    finally:
        await asyncio.gather(polling.close(), upgraded.close())


async def test_a_websocket_that_stops_answering_pings_is_closed_and_forgotten(server: Instance) -> None:
    sock = await RawSocket.open(server.url, await token_for(server.url, "silent"))
    try:
        assert "sid" in await sock.connected()
        assert server.status()[1]["users"] == 1
        assert await sock.ws.receive_str(timeout=PING_INTERVAL + SLACK) == "2"  # never answered
        pinged = time.monotonic()
        # Then the end of the connection. (No Engine.IO CLOSE: python-engineio's send checks
        # the ping deadline first, and a socket past it sends nothing more.)
        message = await sock.ws.receive(timeout=PING_TIMEOUT + 2 * SLACK)
        assert message.type != aiohttp.WSMsgType.TEXT, message
        assert time.monotonic() - pinged >= PING_TIMEOUT * 0.9
        await wait_until(lambda: server.status()[1]["users"] == 0, "the silent user to be gone")
        assert server.status()[1]["sockets"] == 0
    finally:
        await sock.close()


@pytest.mark.parametrize("closed_by", ["ping timeout", "malformed packet"])
async def test_a_websocket_peer_that_ignores_the_close_is_cut_off(server: Instance, closed_by: str) -> None:
    """A peer that keeps the TCP connection up but ignores everything (a hung client, a proxy
    that holds the upstream open, a hostile client): once its socket is closed, by the sweep
    after a ping it left unanswered or at once for a malformed packet, it has a ping timeout to
    answer the close; then the server drops the connection."""
    cut_before = server.status()[1]["websocket"]["cut_off"]
    token = await token_for(server.url, "deaf")
    url = server.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, autoclose=False, autoping=False)
        client_port = ws.get_extra_info("sockname")[1]
        assert (await ws.receive_str(timeout=SLACK)).startswith("0{")
        await ws.send_str(f'40{{"token": "{token}"}}')
        assert (await ws.receive_str(timeout=SLACK)).startswith("40{")
        if closed_by == "ping timeout":
            assert await ws.receive_str(timeout=PING_INTERVAL + SLACK) == "2"
            closing_in = PING_TIMEOUT  # the sweep closes it a ping timeout after the ping
        else:
            await ws.send_str("42[1]")  # an event without a name: the server disconnects it
            assert await ws.receive_str(timeout=SLACK) == "1"  # Engine.IO's CLOSE, as the library sends
            closing_in = 0
        started = time.monotonic()
        # The server's close frame; after it this client reads nothing more, so never answers
        # it (aiohttp would on the next read).
        closing = await ws.receive(timeout=closing_in + 2 * SLACK)
        assert closing.type == aiohttp.WSMsgType.CLOSE, closing
        assert _open_from(server.port, client_port)
        # The server aborts it; its reader then sees the peer gone, and the socket is forgotten.
        await wait_until(
            lambda: not _open_from(server.port, client_port),
            "the server to drop the connection",
            timeout=PING_TIMEOUT + 2 * SLACK,
        )
        assert time.monotonic() - started >= (closing_in + PING_TIMEOUT) * 0.9  # the close waited its turn
    assert server.status()[1]["websocket"]["cut_off"] == cut_before + 1  # and the operator sees it
    await wait_until(lambda: server.status()[1]["sockets"] == 0, "the socket to be forgotten")


def _open_from(port: int, client_port: int) -> bool:
    """Whether the server still holds its end of the connection from `client_port` (ESTABLISHED
    or CLOSE_WAIT, as /proc/net/tcp shows it)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if (local, remote) == (port, client_port) and fields[3] in ("01", "08"):
            return True
    return False


async def test_a_polling_session_that_stops_polling_is_closed_and_forgotten(
    server: Instance, http: aiohttp.ClientSession  # noqa: F811 - the fixture imported above
) -> None:
    session = Polling(http, server.url)
    started = time.monotonic()  # the session's first ping is due an interval after it opens
    await session.open()
    assert server.status()[1]["sockets"] == 1
    await wait_until(
        lambda: server.status()[1]["sockets"] == 0,
        "the abandoned session to be closed",
        timeout=PING_INTERVAL + PING_TIMEOUT + 2 * SLACK,
    )
    assert time.monotonic() - started >= PING_INTERVAL + PING_TIMEOUT * 0.9
    assert await session.get_status() == 400  # the session is gone, not merely idle

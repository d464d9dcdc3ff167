"""Long-polling sessions: malformed POSTs are answered at once, aborted sessions answer a
pending GET with a valid payload, and the handshake advertises the configured heartbeat."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from webapp.config import ConfigError, Settings

from .harness import Instance, instance_env, unique, wait_until

pytestmark = pytest.mark.cluster

SEPARATOR = "\x1e"  # Engine.IO v4 separates the packets of one polling payload with it
ANSWER_WITHIN = 1.0


def open_connections(port: int) -> int:
    """Server-side TCP connections on `port` that are not closed yet (ESTABLISHED or CLOSE_WAIT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in ("01", "08"):
                count += 1
    return count


def closing_wait(port: int) -> int:
    """Server-side TCP connections on `port` in CLOSE-WAIT: their client closed, the server has not."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "08"
    return count


class Polling:
    """A bare Engine.IO v4 long-polling session; every request on a connection of its own."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.url = base + "/socket.io/?EIO=4&transport=polling"
        self.sid = ""
        self.handshake: dict[str, object] = {}

    async def open(self) -> None:
        packets = await self.get()
        assert packets[0].startswith("0{"), packets
        self.handshake = json.loads(packets[0][1:])
        self.sid = str(self.handshake["sid"])
        assert await self.post("40") == (200, "ok")
        answer = await self.get()
        assert answer[0].startswith("40{") and "sid" in json.loads(answer[0][2:]), answer

    async def get(self) -> list[str]:
        url = self.url + (f"&sid={self.sid}" if self.sid else "")
        async with self.http.get(url) as response:
            body = await response.text()
            assert response.status == 200, (response.status, body)
            return body.split(SEPARATOR)

    async def get_status(self) -> int:
        async with self.http.get(self.url + f"&sid={self.sid}") as response:
            await response.read()
            return response.status

    async def post(self, payload: str) -> tuple[int, str]:
        async with self.http.post(self.url + f"&sid={self.sid}", data=payload.encode()) as response:
            return response.status, (await response.text()).lower()


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    yield from serve("polling", PING_INTERVAL="2", PING_TIMEOUT="5")


def serve(name: str, **env: str) -> Iterator[Instance]:
    """One instance for a module's tests (its own prefix), killed after; it must log no traceback."""
    instance = Instance(name, instance_env(unique(name), **env)).start()
    instance.wait_serving()
    yield instance
    instance.stop(signal.SIGKILL)
    assert "Traceback" not in instance.output(), instance.output()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive: a connection the server leaves open shows in the table, not in a pool.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


@pytest.mark.parametrize(
    "payload",
    ["4hello", '42["disconnect"]', '42["connect"]', "42[1]", "4{", '40{"token": 1}', "40"],
    ids=["not-a-packet", "reserved-disconnect", "reserved-connect", "no-event-name", "cut-json",
         "second-connect-with-auth", "second-connect"],
)
async def test_a_malformed_post_is_answered_at_once_and_leaves_nothing_open(
    server: Instance, http: aiohttp.ClientSession, payload: str
) -> None:
    session = Polling(http, server.url)
    await session.open()
    assert server.status()[1]["sockets"] >= 1

    # No GET is pending: nothing drains the session's queue while the POST is handled.
    status, body = await asyncio.wait_for(session.post(payload), ANSWER_WITHIN)
    assert (status, body) == (200, "ok")
    # The session is over: the next GET is refused instead of being held open.
    assert await asyncio.wait_for(session.get_status(), ANSWER_WITHIN) == 400
    await wait_until(lambda: server.status()[1]["sockets"] == 0, "the refused socket to be forgotten")
    await wait_until(lambda: open_connections(server.port) == 0, "every connection to be closed")


@pytest.mark.parametrize("payload", ["4hello", "1"], ids=["malformed", "close-packet"])
async def test_a_connection_its_client_closed_is_released_within_a_second(server: Instance, payload: str) -> None:
    # Kept-alive connections (no `Connection: close`): the server keeps each open after its
    # answer, for the Procfile's --keep-alive 30, unless the client ends it.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as kept_alive:
        session = Polling(kept_alive, server.url)
        await session.open()
        assert await asyncio.wait_for(session.post(payload), ANSWER_WITHIN) == (200, "ok")
        assert open_connections(server.port) >= 1
    # The client closed every connection: the server must close its side too, not wait 30 s.
    await wait_until(lambda: closing_wait(server.port) == 0, "no connection left in CLOSE-WAIT", timeout=1.0)
    await asyncio.sleep(1.5)  # and none after 2.5 s either
    assert closing_wait(server.port) == 0 and open_connections(server.port) == 0


async def test_a_client_close_answers_the_pending_get_with_a_valid_payload(
    server: Instance, http: aiohttp.ClientSession
) -> None:
    session = Polling(http, server.url)
    await session.open()
    pending = asyncio.create_task(session.get())
    await wait_until(lambda: open_connections(server.port) >= 1, "the GET to be pending")
    await asyncio.sleep(0.2)  # not a synchronisation: lets the server park the GET on its queue
    assert await asyncio.wait_for(session.post("1"), ANSWER_WITHIN) == (200, "ok")
    packets = await asyncio.wait_for(pending, ANSWER_WITHIN)
    assert packets in (["6"], ["1"]), packets  # a NOOP or a CLOSE: never an empty body
    await wait_until(lambda: server.status()[1]["sockets"] == 0, "the closed socket to be forgotten")


async def test_a_drain_answers_a_pending_get_with_a_valid_payload(http: aiohttp.ClientSession) -> None:
    instance = Instance("polling-drain", instance_env(unique("polling-drain"), SHUTDOWN_TIMEOUT="5")).start()
    try:
        instance.wait_serving()
        session = Polling(http, instance.url)
        await session.open()
        pending = asyncio.create_task(session.get())
        await wait_until(lambda: open_connections(instance.port) >= 1, "the GET to be pending")
        await asyncio.sleep(0.2)  # not a synchronisation: lets the server park the GET on its queue
        assert instance.proc is not None
        instance.proc.send_signal(signal.SIGTERM)
        packets = await asyncio.wait_for(pending, 5)
        # The shutdown notice, then a NOOP: the client's next GET fails and it reconnects elsewhere.
        assert packets[-1] == "6", packets
        assert any(p.startswith('42["server_shutdown"') for p in packets), packets
        assert await asyncio.to_thread(instance.proc.wait, 10) == 0
    finally:
        instance.stop(signal.SIGKILL)
    assert "Traceback" not in instance.output(), instance.output()


async def test_the_handshake_advertises_the_configured_heartbeat(
    server: Instance, http: aiohttp.ClientSession
) -> None:
    session = Polling(http, server.url)
    await session.open()
    assert (session.handshake["pingInterval"], session.handshake["pingTimeout"]) == (2000, 5000)
    assert await session.post("1") == (200, "ok")


def test_fractional_ping_intervals_are_a_configuration_error() -> None:
    # python-engineio advertises the interval truncated to whole seconds (1.5 s as 1000 ms).
    with pytest.raises(ConfigError, match="PING_INTERVAL must be an integer"):
        Settings.from_env({"PING_INTERVAL": "1.5"})
    assert Settings.from_env({"PING_INTERVAL": "2"}).ping_interval == 2

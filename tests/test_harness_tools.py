"""The tools of the recovery tests, proven against real parts: TcpProxy over Redis, JsClients over an app."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from .harness import REDIS_URL, Instance, api, free_port, instance_env, unique, wait_until
from .jsclient import JsClients, client_spec
from .proxy import TcpProxy


def redis_backend() -> tuple[str, int]:
    pool = redis.ConnectionPool.from_url(REDIS_URL)
    kwargs = pool.connection_kwargs
    return str(kwargs.get("host", "127.0.0.1")), int(kwargs.get("port", 6379))


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    with TcpProxy([redis_backend()]) as proxy:
        yield proxy


def test_proxy_forwards_to_redis_cuts_and_restores(redis_proxy: TcpProxy) -> None:
    client = redis.Redis.from_url(redis_proxy.redis_url, socket_timeout=2, socket_connect_timeout=2)
    raw = socket.create_connection(("127.0.0.1", redis_proxy.port), timeout=2)
    try:
        assert client.ping() is True
        raw.sendall(b"PING\r\n")
        assert raw.recv(16) == b"+PONG\r\n"
        assert redis_proxy.connections == 2

        redis_proxy.cut()
        assert redis_proxy.connections == 0
        # cut() returned: the reset is already there, nothing waits for a timeout
        with pytest.raises(ConnectionResetError):
            raw.recv(16)
        with pytest.raises(redis.ConnectionError):
            client.ping()  # its connection was reset, and every reconnection attempt is reset too
        fresh = redis.Redis.from_url(redis_proxy.redis_url, socket_timeout=2, socket_connect_timeout=2)
        with pytest.raises(redis.ConnectionError):
            fresh.ping()
        fresh.close()
        assert redis_proxy.connections == 0

        redis_proxy.restore()
        assert client.ping() is True
        assert client.set(unique("proxy"), "v", ex=5) is True
        assert redis_proxy.connections == 1
    finally:
        raw.close()
        client.close()


def test_proxy_close_is_idempotent_and_refuses_use_after() -> None:
    proxy = TcpProxy([redis_backend()]).start()
    port = proxy.port
    proxy.close()
    proxy.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError):
        proxy.cut()


@pytest.fixture
async def named_backends() -> AsyncIterator[dict[str, tuple[str, int]]]:
    """Two tiny servers that answer their own name and close: which one a connection reached."""
    servers: list[asyncio.Server] = []
    found: dict[str, tuple[str, int]] = {}
    for name in ("A", "B"):

        async def answer(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = name
        ) -> None:
            writer.write(name.encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        found[name] = ("127.0.0.1", int(server.sockets[0].getsockname()[1]))
    yield found
    for server in servers:
        server.close()
        await server.wait_closed()


async def reached(proxy: TcpProxy) -> str:
    """Connect through the proxy and return the backend's name ("" when the proxy turned us away)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    except ConnectionResetError:  # reset before asyncio even saw the connection complete
        return ""
    try:
        return (await asyncio.wait_for(reader.read(), 5)).decode()
    except ConnectionResetError:
        return ""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionResetError:
            pass


async def test_proxy_round_robin_and_dead_backends(named_backends: dict[str, tuple[str, int]]) -> None:
    a, b = named_backends["A"], named_backends["B"]
    dead = ("127.0.0.1", free_port())  # nobody listens there: connections are refused
    with TcpProxy([a, b]) as proxy:
        assert [await reached(proxy) for _ in range(4)] == ["A", "B", "A", "B"]

        proxy.set_backends([dead, b, dead, a])
        assert [await reached(proxy) for _ in range(4)] == ["B", "B", "A", "A"]

        proxy.set_backends([dead])
        assert await reached(proxy) == ""

        proxy.set_backends([a])
        proxy.cut()
        assert await reached(proxy) == ""
        proxy.restore()
        assert await reached(proxy) == "A"
        assert proxy.accepted == 11
        await wait_until(lambda: proxy.connections == 0, "every forwarded pair closed")


@pytest.fixture
def solo() -> Iterator[Instance]:
    instance = Instance("solo", instance_env(unique("jsclient"), redis_url=None)).start()
    try:
        instance.wait_serving()
        yield instance
    finally:
        instance.stop()


@pytest.mark.cluster
async def test_js_client_receives_a_broadcast_exactly_once(solo: Instance) -> None:
    clients = await JsClients.start(solo.url, [client_spec("c1", None, recover=False)])
    try:
        [connected] = clients.connects("c1")
        assert connected["recovered"] is False and connected["id"]

        data = {"headline": "hello", "n": 1}
        status, answer = await api(solo.url, "/api/emit/all", {"event": "news", "data": data})
        assert status == 202, answer
        # a fence after it: once the fence is in, a duplicate of "news" would be in too
        marker = uuid.uuid4().hex
        status, answer = await api(solo.url, "/api/emit/all", {"event": "fence", "data": marker})
        assert status == 202, answer
        await clients.wait_until(lambda: [marker] in clients.of("c1", "fence"), "the fence")

        assert clients.events("c1") == [("news", [data]), ("fence", [marker])]
        assert clients.of("c1", "news") == [[data]]
        assert clients.disconnects("c1") == [] and clients.connect_errors("c1") == []
    finally:
        code = await clients.close()
    assert code == 0
    assert await clients.close() == 0  # idempotent
    assert clients.disconnects("c1") == ["io client disconnect"]


@pytest.mark.cluster
async def test_js_client_through_the_proxy_reconnects_after_a_cut(solo: Instance) -> None:
    with TcpProxy([("127.0.0.1", solo.port)]) as proxy:
        clients = await JsClients.start(proxy.url_for(), [client_spec("c1")])
        try:
            assert proxy.connections == 1
            proxy.cut()
            await clients.wait_until(
                lambda: clients.disconnects("c1") == ["transport close"], "the disconnect"
            )
            proxy.restore()
            await clients.wait_until(lambda: len(clients.connects("c1")) == 2, "the reconnection")
            assert proxy.connections == 1
        finally:
            await clients.close()

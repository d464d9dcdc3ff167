"""Churn leaves nothing behind: handshakes cut off while Redis is slow, and joins racing their
socket's disconnect, end with every channel's subscriber count and python-socketio's room
table back where they started."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest
import redis

from .harness import Instance, RedisServer, api, instance_env, token_for, unique, wait_until
from .proxy import TcpProxy
from .test_recovery import Wire

pytestmark = pytest.mark.cluster

ROUNDS = 2_000


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def counts(instance: Instance) -> dict[str, int]:
    """What a leak would raise: sockets, python-socketio's room table, the channels wanted."""
    status = instance.status()[1]
    return {"sockets": status["sockets"], "room_entries": status["room_entries"], "wanted": status["bus"]["wanted"]}


def settled(instance: Instance, baseline: dict[str, int]) -> bool:
    return counts(instance) == baseline


async def cut_off_handshake(session: aiohttp.ClientSession, base: str, token: str) -> None:
    """Open a WebSocket, ask to connect as a user, and leave before the answer."""
    url = base.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    async with session.ws_connect(url) as ws:
        await ws.receive_str(timeout=5)
        await ws.send_str("40" + json.dumps({"token": token}))


async def test_cut_off_handshakes_and_joins_racing_disconnects_leak_nothing(
    own_redis: RedisServer, instances: list[Instance]
) -> None:
    a = Instance("A", instance_env(unique("churn"), redis_url=own_redis.url, REDIS_TIMEOUT="2"),
                 app="tests.open_app:app").start()
    instances.append(a)
    a.wait_serving()
    baseline = counts(a)
    users = [unique(f"u{n}") for n in range(20)]
    tokens = await asyncio.gather(*(token_for(a.url, user) for user in users))
    with redis.Redis.from_url(own_redis.url) as pauser:
        # 1. Handshakes whose user channel Redis is slow to confirm, cut off by their clients.
        async with aiohttp.ClientSession() as session:
            for start in range(0, ROUNDS, 200):
                pauser.execute_command("CLIENT", "PAUSE", "300", "ALL")
                await asyncio.gather(*(
                    cut_off_handshake(session, a.url, tokens[n % len(tokens)]) for n in range(start, start + 200)
                ))
        await wait_until(lambda: settled(a, baseline), f"A back at {baseline} after cut-off handshakes", timeout=30)

        # 2. Joins racing their socket's disconnect, by the socket itself.
        for start in range(0, ROUNDS, 100):
            wires = await asyncio.gather(*(
                Wire.connect(a.url, {"token": tokens[n % len(tokens)]}) for n in range(start, start + 100)
            ))

            async def join_and_go(wire: Wire, n: int) -> None:
                await wire.ws.send_str("421" + json.dumps(["join", {"room": f"team:churn{n % 7}"}]))
                await wire.close()

            await asyncio.gather(*(join_and_go(wire, n) for n, wire in enumerate(wires)))
        await wait_until(lambda: settled(a, baseline), f"A back at {baseline} after racing joins", timeout=30)
        for user in users:
            channel = f"{a.env['CHANNEL_PREFIX']}:user:{user}"
            assert dict(pauser.pubsub_numsub(channel))[channel.encode()] == 0
        rooms = [f"{a.env['CHANNEL_PREFIX']}:room:team:churn{n}" for n in range(7)]
        assert all(count == 0 for _, count in pauser.pubsub_numsub(*rooms))
        assert "Traceback" not in a.output(), a.output()[-3000:]


async def test_publishing_goes_on_after_its_connections_are_reset_under_load(
    own_redis: RedisServer, instances: list[Instance]
) -> None:
    """Publishes in flight when the instance's Redis connections are reset fail (503) and no more:
    once Redis answers again every emit is answered 202. (uvloop raised RuntimeError there, which
    killed the publisher: every later emit waited forever while /readyz said 200.)"""
    with TcpProxy([("127.0.0.1", own_redis.port)]).start() as link:
        a = Instance("A", instance_env(unique("reset"), redis_url=link.redis_url, REDIS_BACKOFF_MAX="0.3")).start()
        instances.append(a)
        a.wait_serving()

        async def emit() -> int:
            status, _ = await asyncio.wait_for(api(a.url, "/api/emit/all", {"event": "m", "data": 1}), 8)
            return status

        in_flight: list[asyncio.Future[int]] = []
        for n in range(100):  # 50 a second, so that some are in flight at the cut
            in_flight.append(asyncio.ensure_future(emit()))
            if n == 25:
                await asyncio.to_thread(link.cut)
            if n == 75:
                await asyncio.to_thread(link.restore)
            await asyncio.sleep(0.02)
        assert set(await asyncio.gather(*in_flight)) <= {202, 503}  # every one answered, none hung
        await wait_until(lambda: a.readyz()[0] == 200, "A back on Redis", timeout=15)
        assert [await emit() for _ in range(5)] == [202] * 5

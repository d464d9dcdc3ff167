"""Client CPU of one publish, three ways: `python -m bench.publish_cost`.

A plain PUBLISH (the baseline; ours with REPLAY_MAX_LEN=0), our Lua script that appends to the
replay stream and publishes in one EVALSHA, and the MULTI/XADD/PUBLISH/EXEC transaction it
replaced. Measured with redis-py's asyncio client, as the apps use it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import BlockingConnectionPool, Redis

MESSAGE = (
    b'{"v":1,"id":"0123456789abcdef0123456789abcdef","scope":"user","event":"dm","data":{"s":1,"t":2.0},'
    b'"user_id":"u-1","origin":{"instance":"A","sid":null},"ts":1.0}'
)
COUNT = 4000


async def measure(url: str = "redis://127.0.0.1:6379/0") -> dict[str, float]:
    """Microseconds of client CPU per publish, per way (after a warm-up)."""
    client = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=10))
    prefix = f"bench-publish-{uuid.uuid4().hex[:6]}"
    channel, stream = f"{prefix}:ch", f"{prefix}:replay"

    async def plain() -> None:
        await client.publish(channel, MESSAGE)

    script = client.register_script(
        "redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'm', ARGV[2]) "
        "return redis.call('PUBLISH', ARGV[1], ARGV[2])"
    )

    async def scripted() -> None:
        await script(keys=[stream], args=[channel, MESSAGE, 10_000])

    async def transaction() -> None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"c": channel, "m": MESSAGE}, maxlen=10_000)
            pipe.publish(channel, MESSAGE)
            await pipe.execute()

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "PUBLISH": plain,
        "EVALSHA (XADD + PUBLISH)": scripted,
        "MULTI XADD PUBLISH EXEC": transaction,
    }
    costs: dict[str, float] = {}
    try:
        for name, publish in ways.items():
            for _ in range(200):
                await publish()
            started = time.process_time()
            for _ in range(COUNT):
                await publish()
            costs[name] = (time.process_time() - started) / COUNT * 1e6
    finally:
        await client.delete(stream)
        await client.aclose()
    return costs


def main() -> int:
    for name, micros in asyncio.run(measure()).items():
        print(f"{name:<26} {micros:6.0f} µs of client CPU per publish")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Client and Redis CPU per publish, five ways: `python -m bench.publish_cost`.

One at a time: a plain PUBLISH (the baseline; ours with REPLAY_MAX_LEN=0), a Lua script that
appends to the replay stream and publishes in one EVALSHA, and the MULTI/XADD/PUBLISH/EXEC
transaction that script replaced. In batches of `BATCH` (concurrent publishes travel together):
a MULTI of one such script per message, and our bus's script, which takes the whole batch in one
EVALSHA. Measured with redis-py's asyncio client, as the apps use it; Redis's CPU from INFO.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import BlockingConnectionPool, Redis

from webapp.realtime.bus.redis_bus import _PUBLISH_AND_RECORD

MESSAGE = (
    b'{"v":1,"id":"0123456789abcdef0123456789abcdef","scope":"user","event":"dm","data":{"s":1,"t":2.0},'
    b'"user_id":"u-1","origin":{"instance":"A","sid":null},"ts":1.0}'
)
COUNT = 4000
BATCH = 16


async def measure(url: str = "redis://127.0.0.1:6379/0") -> dict[str, tuple[float, float]]:
    """Microseconds of client and of Redis CPU per publish, per way (after a warm-up)."""
    client = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=10))
    prefix = f"bench-publish-{uuid.uuid4().hex[:6]}"
    channel, stream = f"{prefix}:ch", f"{prefix}:replay"

    async def plain() -> None:
        await client.publish(channel, MESSAGE)

    script = client.register_script(
        "redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'm', ARGV[2]) "
        "return redis.call('PUBLISH', ARGV[1], ARGV[2])"
    )
    batch_script = client.register_script(_PUBLISH_AND_RECORD)

    async def scripted() -> None:
        await script(keys=[stream], args=[channel, MESSAGE, 10_000])

    async def multi_of_scripts() -> None:
        # By hash, as the bus sent them (redis-py's Script in a pipeline adds a SCRIPT EXISTS).
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(BATCH):
                pipe.execute_command("EVALSHA", script.sha, 1, stream, channel, MESSAGE, 10_000)
            await pipe.execute()

    async def one_script() -> None:
        await batch_script(keys=[stream], args=[10_000, 300_000, "PUBLISH", *(channel, MESSAGE) * BATCH])

    async def transaction() -> None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"c": channel, "m": MESSAGE}, maxlen=10_000)
            pipe.publish(channel, MESSAGE)
            await pipe.execute()

    # Each way, and how many messages one call publishes.
    ways: dict[str, tuple[Callable[[], Awaitable[None]], int]] = {
        "PUBLISH": (plain, 1),
        "EVALSHA (XADD + PUBLISH)": (scripted, 1),
        "MULTI XADD PUBLISH EXEC": (transaction, 1),
        f"MULTI of {BATCH} EVALSHA": (multi_of_scripts, BATCH),
        f"one EVALSHA of {BATCH}": (one_script, BATCH),
    }
    costs: dict[str, tuple[float, float]] = {}
    try:
        for name, (publish, per_call) in ways.items():
            for _ in range(200 // per_call):
                await publish()
            calls = COUNT // per_call
            redis_before = await _redis_cpu(client)
            started = time.process_time()
            for _ in range(calls):
                await publish()
            client_cpu = time.process_time() - started
            redis_cpu = await _redis_cpu(client) - redis_before
            count = calls * per_call
            costs[name] = (client_cpu / count * 1e6, redis_cpu / count * 1e6)
    finally:
        await client.delete(stream)
        await client.aclose()
    return costs


async def _redis_cpu(client: Redis) -> float:
    """Redis's own CPU seconds so far (its main thread and the rest)."""
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main() -> int:
    for name, (client_us, redis_us) in asyncio.run(measure()).items():
        print(f"{name:<26} {client_us:6.1f} µs of client CPU, {redis_us:5.1f} µs of Redis CPU per publish")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

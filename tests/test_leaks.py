"""5,000 connect/disconnect cycles leave nothing behind: no state, no channel, no memory growth."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis

from webapp.auth.tokens import TokenSigner

from .harness import SECRET_KEY, Instance, RawSocket, instance_env, rss_kib, unique, wait_until

pytestmark = pytest.mark.cluster

CYCLES = 5000
WARM_UP = 1000
# Engine.IO keeps a closed socket alive until its pending ping task wakes (PING_INTERVAL), so
# memory is measured once that window has passed; 2 s keeps the test short.
PING_INTERVAL = 2
USERS = 100
PARALLEL = 50
# Measured here: a few MiB at most after warm-up (allocator noise); a leak of even 1 KiB per
# cycle would show as 5 MiB more, a socket's worth of state (~40 KiB) as 200 MiB.
MAX_GROWTH_KIB = 8 * 1024


async def cycles(base: str, count: int, tokens: list[str]) -> None:
    async def one(n: int) -> None:
        raw = await RawSocket.open(base, token=tokens[n % len(tokens)])
        try:
            assert "sid" in await raw.connected()
        finally:
            await raw.close()

    for start in range(0, count, PARALLEL):
        await asyncio.gather(*(one(n) for n in range(start, min(count, start + PARALLEL))))


async def test_connect_disconnect_cycles_leak_nothing(redis_client: redis.Redis) -> None:
    prefix = unique("leaks")
    instance = Instance("leaky", instance_env(prefix, PING_INTERVAL=str(PING_INTERVAL))).start()
    try:
        instance.wait_serving()
        signer = TokenSigner(SECRET_KEY)
        tokens = [signer.mint(f"user{n}", ttl=600).value for n in range(USERS)] + [None]  # type: ignore[list-item]
        pid = instance.proc.pid  # type: ignore[union-attr]

        await cycles(instance.url, WARM_UP, tokens)
        await wait_until(lambda: instance.status()[1]["sockets"] == 0, "warm-up sockets to go")
        await asyncio.sleep(PING_INTERVAL + 1)  # not a synchronisation: lets closed sockets expire
        before = rss_kib(pid)
        started = time.monotonic()
        await cycles(instance.url, CYCLES, tokens)
        took = time.monotonic() - started

        def settled() -> bool:
            body = instance.status()[1]
            # wanted: what the instance means to hold; channels: what Redis confirmed it holds
            # (all, authenticated, and its own sync and node channels)
            held = (body["bus"]["wanted"], body["bus"]["channels"])
            return (body["sockets"], body["users"], *held) == (0, 0, 4, 4)

        await wait_until(settled, "the state to empty", timeout=30)
        assert redis_client.pubsub_channels(f"{prefix}:user:*") == []
        await asyncio.sleep(PING_INTERVAL + 1)
        growth = rss_kib(pid) - before
        print(f"{CYCLES} cycles in {took:.1f}s; RSS {before} KiB -> {before + growth} KiB ({growth:+d} KiB)")
        assert growth < MAX_GROWTH_KIB, f"RSS grew by {growth} KiB over {CYCLES} cycles"
    finally:
        instance.stop(signal.SIGKILL)

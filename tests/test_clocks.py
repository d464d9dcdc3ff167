"""Redis's clock, not ours: instances whose clocks run behind Redis's by two minutes deliver every
event once, keep their recovering clients' offsets, and enforce revocations minted elsewhere.

Debian's faketime cannot run Debian's redis-server (its built-in jemalloc calls clock_gettime while
libfaketime initialises: wolfcw/libfaketime#130), so the instances run under it instead, behind
Redis's clock: to them Redis runs ahead, which is the fault.
"""

from __future__ import annotations

import asyncio
import glob
from typing import Any

import pytest
import redis
import socketio

from webapp.client import RecoveringClient

from .harness import WAIT, Instance, Probe, api, instance_env, token_for, unique, wait_until
from .test_replay import kill_subscriber

pytestmark = pytest.mark.cluster


def behind_redis(seconds: int) -> dict[str, str]:
    """Environment for an instance whose clock (time.time) runs `seconds` behind everyone's."""
    found = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    if not found:
        pytest.fail("these tests need Debian's faketime (scripts/test.sh installs it)")
    # Monotonic time stays real: only the wall clock, which offsets and tokens are dated by, moves.
    return {"LD_PRELOAD": found[0], "FAKETIME": f"-{seconds}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def emit(base: str, user: str, n: int) -> None:
    status, answer = await api(base, f"/api/emit/users/{user}", {"event": "tick", "data": n})
    assert status == 202, answer


async def test_an_instance_120_s_behind_redis_delivers_once_through_a_subscriber_kill(
    instances: list[Instance], redis_client: redis.Redis
) -> None:
    prefix = unique("clock")
    a = Instance("A", instance_env(prefix, REDIS_BACKOFF_MAX="0.5", **behind_redis(120))).start()
    b = Instance("B", instance_env(prefix)).start()
    instances.extend([a, b])
    a.wait_serving()
    b.wait_serving()
    user = unique("user")
    ticks: list[Any] = []
    client = RecoveringClient(reconnection=False)
    client.on("tick", lambda data: ticks.append(data))
    await client.connect(a.url, auth={"token": await token_for(b.url, user)}, transports=["websocket"], wait_timeout=WAIT)
    try:
        for n in range(20):
            await emit(b.url, user, n)
        await wait_until(lambda: len(ticks) >= 20, "20 live events")
        assert client.offset is not None, "the live events carried no offset"

        kill_subscriber(redis_client, f"{prefix}:A")
        await wait_until(lambda: a.status()[1]["bus"]["reconnects"] >= 1, "A to reconnect")
        await wait_until(lambda: a.readyz()[0] == 200, "A caught up")
        for n in range(20, 30):
            await emit(b.url, user, n)
        await wait_until(lambda: 29 in ticks, "the events after the kill")
        await asyncio.sleep(0.3)  # not a synchronisation: room for a late duplicate to show
        assert ticks == list(range(30)), "duplicates or losses after the subscriber kill"

        # A blink: it recovers on B, two minutes ahead of A, from the offset of the last event,
        # nothing twice (when it left is dated by Redis's clock too, so the window holds).
        await client.disconnect()
        for n in range(30, 35):
            await emit(b.url, user, n)
        await client.connect(b.url, auth={"token": await token_for(b.url, user)}, transports=["websocket"], wait_timeout=WAIT)
        await wait_until(lambda: 34 in ticks, "the missed events")
        await asyncio.sleep(0.3)
        assert client.recovered and ticks == list(range(35))
    finally:
        await client.disconnect()
        await client.shutdown()


async def test_a_revocation_holds_across_hosts_whose_clocks_disagree(
    instances: list[Instance], probes: list[Probe]
) -> None:
    """B's clock is Redis's; A's runs two minutes behind. A token B minted, revoked on A, is
    refused everywhere; tokens minted on either after the revocation work on both."""
    prefix = unique("clock-revoke")
    a = Instance("A", instance_env(prefix, **behind_redis(120))).start()
    b = Instance("B", instance_env(prefix)).start()
    instances.extend([a, b])
    a.wait_serving()
    b.wait_serving()
    user = unique("mallory")
    old = await token_for(b.url, user)
    await asyncio.sleep(0.05)  # not a synchronisation: the revocation comes after the mint
    status, answer = await api(a.url, f"/api/users/{user}/revoke")
    assert status == 202, answer
    for instance in (a, b):
        refused = Probe(f"old@{instance.name}")
        probes.append(refused)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(instance.url, old)
        assert refused.connect_error["data"]["code"] == "invalid_token", refused.connect_error
    await asyncio.sleep(0.05)
    for minter, instance in ((a, b), (b, a), (a, a), (b, b)):
        fresh = Probe(f"fresh from {minter.name}@{instance.name}")
        probes.append(fresh)
        await fresh.connect(instance.url, await token_for(minter.url, user))
        assert fresh.client.connected

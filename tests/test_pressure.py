"""Under pressure: an instance that Redis disconnects for lagging (its pub/sub output-buffer limit)
reconnects and catches up from the history; an instance that cannot deliver as fast as events
come stops queueing live messages past its inbox's bound and catches up from the history
instead. Nothing acknowledged is lost; what the history no longer holds is reported as a gap."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from webapp.client import RecoveringClient

from .harness import (
    WAIT,
    Instance,
    Probe,
    RedisServer,
    api,
    instance_env,
    start_pair,
    token_for,
    unique,
    wait_until,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop(signal.SIGKILL)


async def flood_user(base: str, user: str, stop: asyncio.Event, acked: list[int], size: int, per_call: int = 20) -> None:
    """Batches of `per_call` events of `size` bytes to one user, back to back, until `stop`."""
    n = 0
    blob = "x" * size
    while not stop.is_set():
        events = [{"scope": "user", "user_id": user, "event": "tick", "data": [n + i, blob]} for i in range(per_call)]
        status, answer = await api(base, "/api/emit/batch", {"events": events})
        assert status == 202, answer
        acked.extend(range(n, n + per_call))
        n += per_call


def numbers(probe: Probe) -> list[int]:
    return [int(data[0]) for data in probe.of("tick")]


async def wait_for_tick(probe: Probe, n: int, timeout: float = 30) -> None:
    """Until the probe got tick `n` (bounded; the failure names counts, not the payloads)."""
    await wait_until(lambda: n in numbers(probe) or not probe.client.connected, f"tick {n}", timeout=timeout)
    assert probe.client.connected, f"{probe.name} was disconnected after {len(numbers(probe))} ticks"


async def test_redis_disconnecting_a_lagging_subscriber_loses_nothing(
    own_redis: RedisServer, instances: list[Instance]
) -> None:
    """A pub/sub output-buffer limit far below one batch: every batch to A's user makes Redis
    drop A's subscriber connection; A reconnects and reads what it missed from the history."""
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("client-output-buffer-limit", "pubsub 32kb 16kb 1")
    prefix = unique("obuf")
    # A catch-up hands its whole backlog to the socket at once (replays at the socket's pace are
    # another matter): a queue bound of its own keeps the reader from counting as slow here.
    env = {"REDIS_BACKOFF_MAX": "0.2", "MAX_PAYLOAD_BYTES": "262144", "SOCKET_MAX_QUEUE": "100000"}
    a, b = start_pair(
        instances, instance_env(prefix, redis_url=own_redis.url, **env), instance_env(prefix, redis_url=own_redis.url, **env)
    )
    user = unique("user")
    probe = Probe(f"{user}@A")
    await probe.connect(a.url, await token_for(b.url, user))
    acked: list[int] = []
    stop = asyncio.Event()
    try:
        # 20 events of 4 KB in one batch: one script call puts 80 KB in A's output buffer at once.
        flood = asyncio.create_task(flood_user(b.url, user, stop, acked, 4096))
        await wait_until(lambda: a.status()[1]["bus"]["reconnects"] >= 3, "Redis to drop A's subscriber a few times")
        stop.set()
        await flood
        assert "lost (ConnectionError: Connection closed by server" in a.output()  # Redis's doing, not ours
        # The batches after the flood are small: A stays connected and catches up.
        admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
        status, answer = await api(b.url, f"/api/emit/users/{user}", {"event": "tick", "data": [-1, "last"]})
        assert status == 202, answer
        await wait_for_tick(probe, -1)
        got = numbers(probe)
        assert got == [*acked, -1], f"{len(got) - len(set(got))} duplicates, lost {sorted(set(acked) - set(got))[:20]}"
        bus: dict[str, Any] = a.status()[1]["bus"]
        assert bus["gaps"] == 0 and bus["replayed"] > 0 and probe.client.connected
    finally:
        await probe.close()


async def test_an_inbox_past_its_bound_reads_from_the_history_and_loses_nothing(instances: list[Instance]) -> None:
    """INBOX_MAX_MESSAGES=20 against batches of 100: A stops queueing live messages at 20, and
    reads the rest from the history once it has delivered those."""
    prefix = unique("inbox")
    a, b = start_pair(
        instances,
        instance_env(prefix, INBOX_MAX_MESSAGES="20", SOCKET_MAX_QUEUE="100000"),
        instance_env(prefix, MAX_PAYLOAD_BYTES="262144"),
    )
    user = unique("user")
    probe = Probe(f"{user}@A")
    await probe.connect(a.url, await token_for(b.url, user))
    acked: list[int] = []
    stop = asyncio.Event()
    try:
        flood = asyncio.create_task(flood_user(b.url, user, stop, acked, 100, per_call=100))
        await wait_until(lambda: a.status()[1]["bus"]["overflows"] >= 5, "A's inbox to overflow a few times")
        stop.set()
        await flood
        status, answer = await api(b.url, f"/api/emit/users/{user}", {"event": "tick", "data": [-1, "last"]})
        assert status == 202, answer
        await wait_for_tick(probe, -1)
        got = numbers(probe)
        assert got == [*acked, -1], f"{len(got) - len(set(got))} duplicates, lost {sorted(set(acked) - set(got))[:20]}"
        bus: dict[str, Any] = a.status()[1]["bus"]
        assert bus["shed"] > 0 and bus["replayed"] >= bus["shed"] and bus["gaps"] == 0
    finally:
        await probe.close()


async def test_what_the_history_no_longer_holds_is_reported_as_a_gap(instances: list[Instance]) -> None:
    """A is frozen (SIGSTOP) while 1,000 events go to its user and the history keeps about 100:
    thawed, it queues 10 and leaves the rest to a history that no longer holds them. Its
    recovering socket gets every event or `recovery_failed` {"reason": "gap"}."""
    prefix = unique("inbox-gap")
    a = Instance("A", instance_env(prefix, INBOX_MAX_MESSAGES="10", REPLAY_MAX_LEN="100")).start()
    b = Instance("B", instance_env(prefix, REPLAY_MAX_LEN="100", MAX_PAYLOAD_BYTES="262144")).start()
    instances.extend([a, b])
    a.wait_serving()
    b.wait_serving()
    user = unique("user")
    ticks: list[int] = []
    failures: list[Any] = []
    client = RecoveringClient(reconnection=False)
    client.on("tick", lambda data: ticks.append(int(data[0])))
    client.on("recovery_failed", lambda data: failures.append(data))
    await client.connect(a.url, auth={"token": await token_for(b.url, user)}, transports=["websocket"], wait_timeout=WAIT)
    assert a.proc is not None
    try:
        a.proc.send_signal(signal.SIGSTOP)
        acked: list[int] = []
        for n in range(0, 1000, 100):
            events = [{"scope": "user", "user_id": user, "event": "tick", "data": [i, ""]} for i in range(n, n + 100)]
            status, answer = await api(b.url, "/api/emit/batch", {"events": events})
            assert status == 202, answer
            acked.extend(range(n, n + 100))
        a.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: failures, "the gap to be reported")
        assert failures == [{"reason": "gap"}]
        assert a.status()[1]["bus"]["gaps"] >= 1 and client.connected
        assert ticks == sorted(set(ticks)) and set(ticks) <= set(acked) and len(ticks) < len(acked)
    finally:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        await client.disconnect()
        await client.shutdown()

"""Replay after a reconnect, on the bus itself against a real Redis: what was published while the
subscriber was away arrives once; what it had already delivered does not arrive again."""

from __future__ import annotations

import redis

from webapp.realtime.bus import RedisBus

from .harness import REDIS_URL, unique, wait_until


def kill_subscriber(redis_client: redis.Redis, name: str) -> None:
    """Cut the named subscriber's connection from the Redis side, as a network blip would."""
    for client in redis_client.client_list():
        if client.get("name") == f"{name}:sub":
            redis_client.client_kill_filter(_id=client["id"])
            return
    raise AssertionError(f"no subscriber named {name}:sub")


async def test_reconnecting_subscriber_replays_what_it_missed_once(redis_client: redis.Redis) -> None:
    prefix = unique("replay")
    channel = f"{prefix}:all"
    got: list[bytes] = []

    async def collect(_: str, message: bytes) -> None:
        got.append(message)

    async def noop(_: str, __: bytes) -> None:
        return None

    subscriber = RedisBus(REDIS_URL, replay_key=f"{prefix}:replay", name=f"{prefix}:sub-side", backoff_min=0.2)
    publisher = RedisBus(REDIS_URL, replay_key=f"{prefix}:replay", name=f"{prefix}:pub-side")
    await subscriber.start(collect)
    await publisher.start(noop)
    try:
        await wait_until(lambda: subscriber.ready, "the subscriber to connect")
        assert await subscriber.subscribe(channel)
        await publisher.publish(channel, b"before")
        await wait_until(lambda: got == [b"before"], "the first message")

        kill_subscriber(redis_client, f"{prefix}:sub-side")
        await wait_until(lambda: not subscriber.ready, "the subscriber to notice")
        # published while the subscriber is away (it waits at least 0.1 s before reconnecting)
        await publisher.publish(channel, b"while away")
        await wait_until(lambda: subscriber.ready, "the subscriber to come back")
        await publisher.publish(channel, b"after")
        await wait_until(lambda: b"after" in got, "the live message after recovery")
        assert got == [b"before", b"while away", b"after"]
        assert subscriber.replayed == 1
    finally:
        await subscriber.close()
        await publisher.close()
        redis_client.delete(f"{prefix}:replay")

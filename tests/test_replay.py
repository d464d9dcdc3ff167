"""The bus resumes from offsets, against a real Redis: after any gap it delivers what it missed
once and in order, drops the overlap at the seam, and reports what the history no longer holds."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis

from webapp.realtime.bus import BusUnavailable, Mark, Position, RedisBus
from webapp.realtime.bus.redis_bus import SCRIPT_BATCH_MAX

from .harness import REDIS_URL, RedisServer, unique, wait_until


def kill_subscriber(redis_client: redis.Redis, name: str) -> None:
    """Cut the named subscriber's connection from the Redis side, as a network blip would."""
    for client in redis_client.client_list():
        if client.get("name") == f"{name}:sub":
            redis_client.client_kill_filter(_id=client["id"])
            return
    raise AssertionError(f"no subscriber named {name}:sub")


class Collected:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.offsets: list[Mark | None] = []
        self.gaps: list[str] = []

    async def on_message(self, _: str, message: bytes, mark: Mark | None) -> None:
        # The live copy carries its offset spliced in; the replayed copy is the stored envelope.
        self.messages.append(message.split(b'"m":', 1)[-1].rstrip(b"}"))
        self.offsets.append(mark)

    async def on_gap(self, reason: str) -> None:
        self.gaps.append(reason)


@pytest.fixture(scope="module")
def own_redis() -> Iterator[tuple[str, redis.Redis]]:
    """A redis-server of this module's own (its URL and a client): the script calls it counts and
    the script cache it empties are nobody else's, whoever shares the machine's Redis."""
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url)
    try:
        yield server.url, client
    finally:
        client.close()
        server.stop(signal.SIGKILL)


def envelope(text: str) -> bytes:
    return b'{"v":1,"m":' + text.encode() + b"}"


@asynccontextmanager
async def pair(
    prefix: str, url: str = REDIS_URL, collected: Collected | None = None, **subscriber_options: object
) -> AsyncIterator[tuple[RedisBus, RedisBus, Collected, Callable[[str], bytes]]]:
    """A subscribing bus and a publishing bus on one history, both started and closed."""
    options = {"history_key": f"{prefix}:replay", "epoch_key": f"{prefix}:epoch"}
    subscriber_options = {"backoff_min": 0.2, **subscriber_options}
    subscriber = RedisBus(url, name=f"{prefix}:sub-side", **options, **subscriber_options)  # type: ignore[arg-type]
    publisher = RedisBus(url, name=f"{prefix}:pub-side", **options)  # type: ignore[arg-type]
    got = collected or Collected()
    await subscriber.start(got.on_message, got.on_gap)
    await publisher.start(Collected().on_message, Collected().on_gap)
    try:
        await wait_until(lambda: subscriber.ready, "the subscriber to connect")
        assert await subscriber.subscribe(f"{prefix}:all")
        yield subscriber, publisher, got, envelope
    finally:
        await subscriber.close()
        await publisher.close()


async def test_a_gap_of_seconds_is_replayed_once_and_in_order(redis_client: redis.Redis) -> None:
    """The clock-based replay lost what was published more than ~2 s before the reconnect."""
    prefix = unique("replay")
    channel = f"{prefix}:all"
    # backoff of 5 s: the subscriber stays away 2.5 to 5 s after the cut
    async with pair(prefix, backoff_min=5.0) as (subscriber, publisher, got, env):
        await publisher.publish(channel, env('"before"'))
        await wait_until(lambda: got.messages == [b'"before"'], "the first message")
        kill_subscriber(redis_client, f"{prefix}:sub-side")
        await wait_until(lambda: not subscriber.ready, "the subscriber to notice")
        sent = 0
        while not subscriber.ready:  # publish for as long as it is away, at about 200/s
            await publisher.publish(channel, env(str(sent)))
            sent += 1
            await asyncio.sleep(0.005)  # pacing, not waiting: the history keeps 10,000
        await publisher.publish(channel, env('"after"'))
        await wait_until(lambda: got.messages[-1:] == [b'"after"'], "the live message after recovery", timeout=15)
        assert got.messages == [b'"before"', *(str(n).encode() for n in range(sent)), b'"after"']
        assert sent > 20 and subscriber.replayed >= 1 and got.gaps == []
        offsets = [o for o in got.offsets if o is not None]
        assert len(offsets) == len(got.offsets) and offsets == sorted(set(offsets))
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


class DroppingAgain(Collected):
    """A handler that awaits (as the propagator's ops do): at one message of a catch-up, it
    has the subscriber's connection killed and waits until the subscriber has noticed."""

    def __init__(self, redis_client: redis.Redis, name: str, at: bytes) -> None:
        super().__init__()
        self.redis_client, self.name, self.at = redis_client, name, at
        self.bus: RedisBus | None = None
        self.dropped = False

    async def on_message(self, channel: str, message: bytes, mark: Mark | None) -> None:
        await super().on_message(channel, message, mark)
        if self.messages[-1] == self.at and not self.dropped:
            self.dropped = True
            kill_subscriber(self.redis_client, self.name)
            bus = self.bus
            assert bus is not None
            await wait_until(lambda: not bus.status()["connected"], "the subscriber to notice the second drop")


async def test_a_subscriber_dropped_again_mid_catch_up_loses_nothing(redis_client: redis.Redis) -> None:
    """The catch-up advanced the position past every entry it had not delivered yet when the
    connection dropped under it: they were never delivered, and no gap was counted."""
    prefix = unique("replay-flap")
    channel = f"{prefix}:all"
    got = DroppingAgain(redis_client, f"{prefix}:sub-side", b"5")
    async with pair(prefix, collected=got, backoff_min=0.4) as (subscriber, publisher, _, env):
        got.bus = subscriber
        await publisher.publish(channel, env('"before"'))
        await wait_until(lambda: got.messages == [b'"before"'], "the first message")
        kill_subscriber(redis_client, f"{prefix}:sub-side")
        await wait_until(lambda: not subscriber.status()["connected"], "the subscriber to notice")
        await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(20)))  # while it is away
        await wait_until(lambda: got.dropped and subscriber.ready, "the second drop, and the subscriber back", timeout=15)
        await publisher.publish(channel, env('"after"'))
        await wait_until(lambda: got.messages[-1:] == [b'"after"'], "the live message after recovery", timeout=15)
        assert got.messages == [b'"before"', *(str(n).encode() for n in range(20)), b'"after"']
        assert got.gaps == [] and subscriber.gaps == 0
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


async def test_a_gap_longer_than_the_history_is_reported(redis_client: redis.Redis) -> None:
    prefix = unique("replay-gap")
    channel = f"{prefix}:all"
    # away 1.5 to 3 s after the cut: the 400 publishes below take a fraction of that
    async with pair(prefix, backoff_min=3.0) as (subscriber, _, got, env):
        short = RedisBus(REDIS_URL, history_key=f"{prefix}:replay", epoch_key=f"{prefix}:epoch", history_max=10)
        await short.start(Collected().on_message, Collected().on_gap)
        try:
            kill_subscriber(redis_client, f"{prefix}:sub-side")
            await wait_until(lambda: not subscriber.ready, "the subscriber to notice")
            # "MAXLEN ~" trims whole stream nodes (100 entries): 400 entries trim some for sure
            for n in range(400):
                await short.publish(channel, env(str(n)))
        finally:
            await short.close()
        await wait_until(lambda: subscriber.ready, "the subscriber to come back", timeout=15)
        await wait_until(lambda: got.gaps == ["gap"], "the gap to be reported")
        assert subscriber.gaps == 1
        # what the history still held arrived, in order, and nothing twice
        numbers = [int(m) for m in got.messages]
        assert numbers == sorted(set(numbers)) and numbers[-1] == 399 and len(numbers) < 400
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


async def test_a_redis_that_lost_its_data_is_noticed_and_its_new_history_replayed() -> None:
    server = RedisServer().start()
    prefix = unique("replay-epoch")
    channel = f"{prefix}:all"
    try:
        async with pair(prefix, url=server.url) as (subscriber, publisher, got, env):
            await publisher.publish(channel, env('"old"'))
            await wait_until(lambda: got.messages == [b'"old"'], "the first message")
            server.stop(signal.SIGKILL)
            server.start()
            await wait_until(lambda: subscriber.ready, "the subscriber to come back", timeout=15)

            async def published() -> bool:
                try:  # the publisher's pooled connection died with Redis: a 503, then retry
                    await publisher.publish(channel, env('"new"'))
                    return True
                except BusUnavailable:
                    return False

            await wait_until(published, "a publish on the new Redis")
            await wait_until(lambda: got.messages[-1:] == [b'"new"'], "the message on the new Redis")
            assert got.messages == [b'"old"', b'"new"'] and subscriber.epoch_changes == 1
    finally:
        server.stop(signal.SIGKILL)


async def test_live_messages_carry_the_offset_the_history_holds(redis_client: redis.Redis) -> None:
    prefix = unique("replay-offsets")
    channel = f"{prefix}:all"
    async with pair(prefix) as (subscriber, publisher, got, env):
        for n in range(3):
            await publisher.publish(channel, env(str(n)))
        await wait_until(lambda: len(got.messages) == 3, "three messages")
        history = await subscriber.history(Position(), [channel])
        assert [e.mark for e in history.entries] == got.offsets
        last = got.offsets[-1]
        assert last is not None and subscriber.position == Position({0: last.offset}) == await subscriber.end()
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


async def test_publishes_survive_an_emptied_script_cache(own_redis: tuple[str, redis.Redis]) -> None:
    """Publishes run the script by its hash; a Redis whose cache is empty (restarted, or a
    promoted replica) answers NOSCRIPT, having run nothing, and gets the script's text once."""
    url, redis_client = own_redis
    prefix = unique("replay-noscript")
    channel = f"{prefix}:all"
    async with pair(prefix, url) as (_, publisher, got, env):
        await publisher.publish(channel, env("0"))
        redis_client.script_flush()
        await publisher.publish(channel, env("1"))  # one alone
        redis_client.script_flush()
        await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(2, 6)))  # one batch
        await wait_until(lambda: len(got.messages) >= 6, "six messages")
        assert [int(m) for m in got.messages] == list(range(6))
        assert len(redis_client.xrange(f"{prefix}:replay")) == 6  # each recorded once
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


async def test_a_large_batch_is_cut_into_script_calls_that_keep_the_order(own_redis: tuple[str, redis.Redis]) -> None:
    """Redis runs one script before anything else: a batch past SCRIPT_BATCH_MAX goes as several
    calls, one after another, so other clients run between them and the offsets keep their order,
    also when the script cache was emptied just before (the first call answers NOSCRIPT, having
    run nothing, and goes again as text; nothing is recorded twice)."""
    url, redis_client = own_redis
    prefix = unique("replay-cut")
    channel = f"{prefix}:all"
    count = 2 * SCRIPT_BATCH_MAX + 44
    async with pair(prefix, url) as (_, publisher, got, env):
        await publisher.publish(channel, env('"warm"'))  # the script is in Redis's cache
        await wait_until(lambda: len(got.messages) == 1, "the first message")
        before = _scripts_run(redis_client)
        marks = await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(count)))
        scripts = _scripts_run(redis_client) - before
        redis_client.script_flush()
        marks += await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(count, 2 * count)))
        await wait_until(lambda: len(got.messages) == 2 * count + 1, f"{2 * count} more messages")
    assert scripts == 3, f"{count} concurrent publishes took {scripts} script calls"
    assert [int(m) for m in got.messages[1:]] == list(range(2 * count))
    offsets = [mark.offset for mark in marks if mark is not None]
    assert len(offsets) == 2 * count and offsets == sorted(offsets) and len(set(offsets)) == 2 * count
    history = redis_client.xrange(f"{prefix}:replay")
    assert [entry_id.decode() for entry_id, _ in history[1:]] == [str(offset) for offset in offsets]
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")


async def test_a_large_batch_on_a_cluster_keeps_its_order(redis_cluster_url: str) -> None:
    """The same cut on a Redis Cluster: the calls go to the partition's master, in order."""
    prefix = unique("replay-cut-cluster")
    channel = f"{prefix}:all"
    count = 2 * SCRIPT_BATCH_MAX + 44
    async with pair(prefix, redis_cluster_url) as (_, publisher, got, env):
        marks = await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(count)))
        await wait_until(lambda: len(got.messages) == count, f"{count} messages")
    assert [int(m) for m in got.messages] == list(range(count))
    offsets = [mark.offset for mark in marks if mark is not None]
    assert len(offsets) == count and offsets == sorted(offsets) and len(set(offsets)) == count
    assert [mark.offset for mark in got.offsets if mark is not None] == offsets


def _scripts_run(redis_client: redis.Redis) -> int:
    """Script calls a Redis has run (INFO commandstats counts the whole server: use one of the test's own)."""
    stats = redis_client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{verb}", {}).get("calls", 0)) for verb in ("evalsha", "eval"))


async def test_concurrent_publishes_travel_as_one_script_and_keep_their_order(
    own_redis: tuple[str, redis.Redis],
) -> None:
    """Publishes queued together go to Redis as one script call (not one per message in a MULTI),
    and each still gets its own offset, in order, live and in the history."""
    url, redis_client = own_redis
    prefix = unique("replay-batch")
    channel = f"{prefix}:all"
    async with pair(prefix, url) as (_, publisher, got, env):
        await publisher.publish(channel, env('"warm"'))  # the script is in Redis's cache
        await wait_until(lambda: len(got.messages) == 1, "the first message")
        before = _scripts_run(redis_client)
        marks = await asyncio.gather(*(publisher.publish(channel, env(str(n))) for n in range(50)))
        scripts = _scripts_run(redis_client) - before
        await wait_until(lambda: len(got.messages) == 51, "fifty more messages")
    assert scripts == 1, f"50 concurrent publishes took {scripts} script calls"
    assert [int(m) for m in got.messages[1:]] == list(range(50))
    offsets = [mark.offset for mark in marks if mark is not None]
    assert len(offsets) == 50 and offsets == sorted(offsets) and len(set(offsets)) == 50
    assert [mark.offset for mark in got.offsets[1:] if mark is not None] == offsets
    history = redis_client.xrange(f"{prefix}:replay")
    assert [entry_id.decode() for entry_id, _ in history[1:]] == [str(offset) for offset in offsets]
    redis_client.delete(f"{prefix}:replay", f"{prefix}:epoch")

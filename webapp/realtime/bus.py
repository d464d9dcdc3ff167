"""Transports that carry envelopes between instances: Redis pub/sub, or memory for one instance.

The propagator speaks envelopes; a bus only moves bytes on named channels. Swapping the
transport touches this file alone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .replay import RecentMessages, stream_id_at

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]

# One round trip, atomically: append to the replay stream, then publish live. A script costs
# the client about half of what MULTI/XADD/PUBLISH/EXEC does (measured: 134 vs 244 us each).
_PUBLISH_AND_RECORD = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'm', ARGV[2])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""


class BusUnavailable(RuntimeError):
    """The bus could not take the message; nothing was handed over."""


class Bus(Protocol):
    kind: str

    async def start(self, handler: MessageHandler) -> None: ...
    async def close(self) -> None: ...
    async def publish(self, channel: str, message: bytes) -> None: ...
    async def subscribe(self, channel: str) -> bool: ...
    async def unsubscribe(self, channel: str) -> None: ...
    @property
    def ready(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


class MemoryBus:
    """A single-instance bus: published messages reach only this process's subscriptions."""

    kind = "memory"

    def __init__(self) -> None:
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._handler: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler
        self._task = asyncio.create_task(self._consume(), name="memory-bus-consumer")

    async def close(self) -> None:
        await _cancel(self._task)
        self._task = None

    async def publish(self, channel: str, message: bytes) -> None:
        if self._task is None:
            raise BusUnavailable("the in-memory bus is not running")
        if channel in self._channels:  # like Redis: who gets it is decided at publish time
            self._queue.put_nowait((channel, message))

    async def subscribe(self, channel: str) -> bool:
        self._channels.add(channel)
        return True

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "connected": self.ready, "channels": len(self._channels)}

    async def _consume(self) -> None:
        assert self._handler is not None
        while True:
            channel, message = await self._queue.get()
            await _dispatch(self._handler, channel, message)


class RedisBus:
    """Redis pub/sub with one subscriber connection read by one consumer task.

    The set of channels this instance should hold is the truth; after any reconnect the
    consumer subscribes to all of it again, so recovery never depends on what Redis remembers.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        idle_ping: float = 5.0,
        max_connections: int = 200,
        replay_key: str | None = None,
        replay_max: int = 10_000,
        replay_margin: float = 2.0,
        name: str = "webapp",
    ) -> None:
        self._url = url
        # Named connections: `CLIENT LIST` shows which instance each belongs to.
        self._name = re.sub(r"[^A-Za-z0-9_.:-]", "_", name)[:100]
        self._timeout = timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._idle_ping = idle_ping
        self._max_connections = max_connections
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._initial: set[str] = set()
        self._waiters: dict[tuple[str, str], deque[asyncio.Future[bool]]] = {}
        self._conn: AbstractConnection | None = None
        self._send_lock = asyncio.Lock()
        self._handler: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._publish_script: AsyncScript | None = None
        self._outgoing: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._outgoing_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._sub_pool: ConnectionPool | None = None
        self._replay_key = replay_key
        self._replay_max = replay_max
        self._replay_margin = replay_margin
        self._recent = RecentMessages(keep=replay_margin + 1.0)
        self._alive_at: float | None = None  # wall time of the last reply read; None before any
        self._catching_up = False
        self._after_replay = False
        self.reconnects = 0
        self.replayed = 0
        self.last_error: str | None = None

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler
        # Publishing borrows from a blocking pool so a burst waits for a connection instead of
        # failing. No retries: a batch whose reply was lost may have been applied, and sending
        # it again would duplicate it; the pool already replaces connections that died.
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._max_connections,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"{self._name}:pub",
        )
        self._client = Redis(connection_pool=pool)
        self._publish_script = self._client.register_script(_PUBLISH_AND_RECORD)
        # RESP2 on the subscriber: its replies are plain arrays this loop reads itself (RESP3
        # would route them to push handlers instead).
        self._sub_pool = ConnectionPool.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            protocol=2,
            client_name=f"{self._name}:sub",
        )
        self._task = asyncio.create_task(self._run(), name="redis-bus-consumer")
        self._sender = asyncio.create_task(self._send_forever(), name="redis-bus-publisher")

    async def close(self) -> None:
        await _cancel(self._task)
        await _cancel(self._sender)
        self._task = self._sender = None
        for _, _, done in self._outgoing:
            if not done.done():
                done.set_exception(BusUnavailable("the Redis bus closed"))
        self._outgoing = []
        await self._drop_connection()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._sub_pool is not None:
            await self._sub_pool.disconnect()
            self._sub_pool = None

    async def publish(self, channel: str, message: bytes) -> None:
        """Hand a message to Redis; raises BusUnavailable when Redis did not take it.

        Concurrent publishes are sent together: one pipeline, one round trip, one pooled
        connection per batch instead of per message. Order is kept (one queue, one sender).
        """
        if self._client is None or self._sender is None:
            raise BusUnavailable("the Redis bus is not running")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, message, done))
        self._outgoing_ready.set()
        await done

    async def _send_forever(self) -> None:
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                error = await self._send_batch(batch)
                for _, _, done in batch:
                    if done.done():
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(BusUnavailable(f"Redis publish failed: {error}"))

    async def _send_batch(self, batch: list[tuple[str, bytes, asyncio.Future[None]]]) -> Exception | None:
        assert self._client is not None and self._publish_script is not None
        try:
            if len(batch) == 1:
                channel, message, _ = batch[0]
                if self._replay_key is None:
                    await self._client.publish(channel, message)
                else:
                    await self._publish_script(keys=[self._replay_key], args=[channel, message, self._replay_max])
                return None
            # MULTI/EXEC: a failed batch was applied whole or not at all, never in part.
            async with self._client.pipeline(transaction=True) as pipe:
                for channel, message, _ in batch:
                    if self._replay_key is not None:
                        pipe.xadd(self._replay_key, {"c": channel, "m": message}, maxlen=self._replay_max)
                    pipe.publish(channel, message)
                await pipe.execute()
            return None
        except (TimeoutError, RedisError, OSError) as exc:
            return exc

    async def subscribe(self, channel: str) -> bool:
        """Hold `channel`; True once Redis confirmed it, False if it will be made on recovery."""
        self._wanted.add(channel)
        return await self._command("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        await self._command("unsubscribe", channel)

    @property
    def ready(self) -> bool:
        return self._conn is not None and not self._initial and not self._catching_up

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "connected": self._conn is not None,
            "channels": len(self._confirmed),
            "wanted": len(self._wanted),
            "reconnects": self.reconnects,
            "replayed": self.replayed,
            "last_error": self.last_error,
        }

    async def _command(self, kind: str, channel: str) -> bool:
        conn = self._conn
        if conn is None:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault((kind, channel), deque())
        queue.append(waiter)
        try:
            await self._send(conn, kind.upper(), channel)
            return await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("Redis %s %s not confirmed: %s", kind, channel, exc)
            return False
        finally:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                self._waiters.pop((kind, channel), None)

    async def _send(self, conn: AbstractConnection, *args: str) -> None:
        # The consumer task reads this connection; writes must never trigger a read.
        async with self._send_lock:
            await conn.send_command(*args, check_health=False)

    async def _run(self) -> None:
        delay = self._backoff_min
        while True:
            try:
                await self._connect()
                delay = self._backoff_min
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisError, OSError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("Redis subscriber lost (%s); retrying in %.1fs", self.last_error, delay)
            except Exception:  # keep the consumer alive whatever a bug throws
                self.last_error = "internal error"
                log.exception("Redis consumer failed; restarting it")
            await self._drop_connection()
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._backoff_max)
            self.reconnects += 1

    async def _connect(self) -> None:
        assert self._sub_pool is not None
        conn: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        self._conn = conn
        self._initial = set(self._wanted)
        # Only a reconnect owes a replay; the first connection of the process owes nothing.
        self._catching_up = self._replay_key is not None and self._alive_at is not None
        if self._initial:
            await self._send(conn, "SUBSCRIBE", *sorted(self._initial))
        self.last_error = None
        log.info("Redis subscriber connected; subscribing %d channels", len(self._initial))

    async def _read_forever(self) -> None:
        assert self._conn is not None and self._handler is not None
        conn = self._conn
        held_back: list[tuple[str, bytes]] = []  # live messages that must wait for the replay
        pinged = False
        if self._catching_up and not self._initial:
            await self._catch_up(held_back)
        while True:
            reply = await conn.read_response(timeout=self._idle_ping)
            if reply is None:
                # Silence can hide a dead peer: ping, and give up if the pong never comes.
                if pinged:
                    raise TimeoutError("Redis did not answer PING")
                await self._send(conn, "PING")
                pinged = True
                continue
            pinged = False
            self._alive_at = time.time()
            kind = reply[0]
            if kind == b"message":
                if self._catching_up:
                    held_back.append((reply[1].decode(), reply[2]))
                    continue
                if self._after_replay:
                    # Published before the replay read the stream, so possibly replayed already;
                    # pub/sub keeps publish order, so the first unseen message ends this check.
                    if reply[2] in self._recent:
                        continue
                    self._after_replay = False
                await self._deliver(reply[1].decode(), reply[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                self._confirm(kind.decode(), reply[1].decode())
                if self._catching_up and not self._initial:
                    await self._catch_up(held_back)
                    held_back = []

    async def _deliver(self, channel: str, message: bytes) -> None:
        assert self._handler is not None
        if self._replay_key is not None:
            self._recent.add(message)
        await _dispatch(self._handler, channel, message)

    async def _catch_up(self, held_back: list[tuple[str, bytes]]) -> None:
        """Replay what was published while this subscriber was away, then what waited."""
        assert self._client is not None and self._replay_key is not None and self._alive_at is not None
        since = stream_id_at(self._alive_at - self._replay_margin)
        # The stream is capped (about REPLAY_MAX_LEN entries), so reading the whole window is bounded.
        entries = await self._client.xrange(self._replay_key, min=since, max="+")
        for _, fields in entries or ():
            channel, message = _as_bytes((fields or {}).get(b"c")).decode(), _as_bytes((fields or {}).get(b"m"))
            if channel in self._confirmed and message not in self._recent:
                self.replayed += 1
                await self._deliver(channel, message)
        for channel, message in held_back:
            if message not in self._recent:
                await self._deliver(channel, message)
        self._catching_up = False
        self._after_replay = True
        log.info("Redis subscriber caught up (%d replayed so far)", self.replayed)

    def _confirm(self, kind: str, channel: str) -> None:
        if kind == "subscribe":
            self._confirmed.add(channel)
            self._initial.discard(channel)
        else:
            self._confirmed.discard(channel)
        queue = self._waiters.get((kind, channel))
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(True)
                break

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._catching_up = self._after_replay = False
        self._confirmed.clear()
        self._initial.clear()
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(False)
        if conn is not None:
            await conn.disconnect(nowait=True)


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value or "").encode()


async def _dispatch(handler: MessageHandler, channel: str, message: bytes) -> None:
    try:
        await handler(channel, message)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler failed for a message on %s; consumption goes on", channel)


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

"""Redis pub/sub for live delivery, and one Redis Stream as the history that gives every event an offset.

Each publish runs one script: XADD to the history stream (the entry id is the event's offset),
trim the stream by count and age, then PUBLISH the envelope with the offset spliced in as its
first field. Pub/sub on one connection keeps the server's execution order, so live messages
arrive in offset order; after any gap the subscriber reads the stream from the last offset it
consumed, then drops live messages at or below it: exactly once, in order, no clock involved.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from .base import ZERO, BusUnavailable, Entry, GapHandler, History, MessageHandler, Offset, cancel, dispatch
from .cluster import REDIS_FAILURES, Client, ShardWatch, Topology, nodes_of, owner_of
from .tls import TlsOptions, certificate_problem

log = logging.getLogger(__name__)

# KEYS[1] history stream; ARGV: channel, envelope, max length, max age in ms. Returns the offset.
# A script is atomic: the history and the live message can never disagree.
_PUBLISH_AND_RECORD = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'm', ARGV[2])
local ms = tonumber(string.match(id, '^%d+'))
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d-0', ms - tonumber(ARGV[4])))
local message = ARGV[2]
if string.byte(message, 1) == 123 and string.byte(message, 2) == 34 then
  message = '{"offset":"' .. id .. '",' .. string.sub(message, 2)
end
redis.call('PUBLISH', ARGV[1], message)
return id
"""
_OFFSET_MARK = b'{"offset":"'
_READ_CHUNK = 1000
# A live offset far ahead of our clock is forged (anyone can publish on our channels): trusting
# it would make the seam drop every real message after it.
_MAX_CLOCK_SKEW_MS = 60_000


def offset_of(message: bytes) -> Offset | None:
    """The offset the publish script spliced into a live message, if it is there and sane."""
    if not message.startswith(_OFFSET_MARK):
        return None
    start = len(_OFFSET_MARK)
    stop = message.find(b'"', start, start + 40)
    offset = Offset.parse(message[start:stop]) if stop > 0 else None
    if offset is None or offset.ms > time.time() * 1000 + _MAX_CLOCK_SKEW_MS:
        return None
    return offset


class RedisBus:
    """Redis pub/sub with one subscriber connection, read by one task and delivered by another.

    The reader only parses replies: subscription confirmations are handled as they arrive and
    are never stuck behind a backlog of deliveries. The set of channels this instance should
    hold is the truth; after any reconnect all of it is subscribed again, then the history is
    read from the last offset consumed before anything live is delivered.
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
        history_key: str | None = None,
        history_max: int = 10_000,
        history_age: float = 300.0,
        epoch_key: str | None = None,
        sync_channel: str | None = None,
        name: str = "webapp",
        tls: TlsOptions | None = None,
        topology: Topology | None = None,
    ) -> None:
        self._url = url
        self._tls: TlsOptions = tls or {}
        # One node or a cluster: asked of Redis at the first connection unless REDIS_CLUSTER says.
        self._topology = topology or Topology(url, forced=None, timeout=timeout, tls=tls)
        # Named connections: `CLIENT LIST` shows which instance each belongs to.
        self._name = re.sub(r"[^A-Za-z0-9_.:-]", "_", name)[:100]
        self._timeout = timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._idle_ping = idle_ping
        self._max_connections = max_connections
        self._history_key = history_key
        self._history_max = history_max
        self._history_age_ms = int(history_age * 1000)
        self._epoch_key = epoch_key
        self._sync_channel = sync_channel
        self._queued_marker: asyncio.Future[Offset | None] | None = None  # a sync marker not sent yet
        self._syncs: list[tuple[Offset, asyncio.Future[Offset]]] = []
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._initial: set[str] = set()
        self._waiters: dict[tuple[str, str], deque[asyncio.Future[bool]]] = {}
        self._conn: AbstractConnection | None = None
        self._send_lock = asyncio.Lock()
        self._handler: MessageHandler | None = None
        self._on_gap: GapHandler | None = None
        self._reader: asyncio.Task[None] | None = None
        self._deliverer: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._client: Client | None = None  # made at the first connection, once the topology is known
        self._sub_pool: ConnectionPool | None = None
        self._shards: ShardWatch | None = None  # on a cluster: which masters do not answer
        self._outgoing: list[tuple[str, bytes, asyncio.Future[Offset | None]]] = []
        self._outgoing_ready = asyncio.Event()
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._inbox_ready = asyncio.Event()
        self._position: Offset | None = None  # the last offset consumed; None before the first connection
        self._epoch: str | None = None
        self._epoch_before: str | None = None
        self._holding = False  # reconnected, waiting for its subscriptions to be confirmed
        self._owed = False  # a catch-up from `_position` is owed before anything live
        self._from_start = False  # ... from the start of the history (Redis lost its data)
        self._generation = 0  # counts connections: a catch-up knows whether another gap began
        self.reconnects = 0
        self.replayed = 0
        self.deduplicated = 0
        self.gaps = 0
        self.epoch_changes = 0
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, handler: MessageHandler, on_gap: GapHandler) -> None:
        self._handler, self._on_gap = handler, on_gap
        if self._sync_channel is not None and self._history_key is not None:
            self._wanted.add(self._sync_channel)
        # RESP2 on the subscriber: its replies are plain arrays this loop reads itself (RESP3
        # would route them to push handlers instead).
        self._sub_pool = ConnectionPool.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            protocol=2,
            client_name=f"{self._name}:sub",
            **self._tls,
        )
        self._shards = ShardWatch(lambda: self._client, timeout=self._timeout)
        self._shards.start()
        self._reader = asyncio.create_task(self._run(), name="redis-bus-reader")
        self._deliverer = asyncio.create_task(self._deliver_forever(), name="redis-bus-deliverer")
        self._sender = asyncio.create_task(self._send_forever(), name="redis-bus-publisher")

    async def close(self) -> None:
        if self._shards is not None:
            await self._shards.close()
        for task in (self._reader, self._deliverer, self._sender):
            await cancel(task)
        self._reader = self._deliverer = self._sender = None
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

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> Offset | None:
        """Hand a message to Redis; raises BusUnavailable when Redis did not confirm it.

        Concurrent publishes are sent together: one round trip (a MULTI when there is a
        history), one pooled connection per batch instead of per message. Order is kept (one
        queue, one sender).
        """
        if self._client is None or self._sender is None:
            raise BusUnavailable("Redis has not been reached yet")
        done: asyncio.Future[Offset | None] = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, message, done))
        self._outgoing_ready.set()
        return await done

    async def sync(self) -> Offset:
        """The position once everything published until now has been consumed here.

        A marker on this instance's own channel goes through the history like any event; once
        the deliverer passes it, nothing published before it is still on its way. (An instance
        with no traffic of its own sees its position stand still while the history moves on.)
        Callers share a marker that is still waiting to be sent: a drain costs one, not one per
        socket.
        """
        if self._sync_channel is None or self._history_key is None:
            return self._position or ZERO
        if self._client is None or self._sender is None:
            raise BusUnavailable("the Redis bus is not running")
        sent = self._queued_marker
        if sent is None:
            sent = self._queued_marker = asyncio.get_running_loop().create_future()
            self._outgoing.append((self._sync_channel, b'{"sync":1}', sent))
            self._outgoing_ready.set()
        marker = await asyncio.shield(sent)
        if marker is None or (self._position is not None and self._position >= marker):
            return self._position or ZERO
        reached: asyncio.Future[Offset] = asyncio.get_running_loop().create_future()
        self._syncs.append((marker, reached))
        try:
            return await asyncio.wait_for(reached, self._timeout)
        except TimeoutError:
            raise BusUnavailable("this instance did not consume its sync marker in time") from None
        finally:
            self._syncs = [(o, f) for o, f in self._syncs if f is not reached]

    def _advance(self, offset: Offset) -> None:
        self._position = offset
        if self._syncs:
            for marker, reached in self._syncs:
                if marker <= offset and not reached.done():
                    reached.set_result(offset)

    async def _send_forever(self) -> None:
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                self._queued_marker = None  # taken: a later sync needs a marker of its own
                result = await self._send_batch(batch)
                for index, (_, _, done) in enumerate(batch):
                    if done.done():
                        continue
                    if isinstance(result, Exception):
                        done.set_exception(BusUnavailable(f"Redis did not confirm the publish: {result}"))
                    else:
                        done.set_result(result[index])

    async def _send_batch(
        self, batch: list[tuple[str, bytes, asyncio.Future[Offset | None]]]
    ) -> list[Offset | None] | Exception:
        """The offset of each message (None without a history), or what went wrong."""
        assert self._client is not None
        try:
            if len(batch) == 1:
                channel, message, _ = batch[0]
                replies = [await self._client.execute_command(*self._publish_args(channel, message))]
            else:
                # MULTI/EXEC: Redis applies the batch whole or not at all, never in part.
                # (Without a history, PUBLISH names no key: a cluster cannot run it in a MULTI.)
                async with self._client.pipeline(transaction=self._history_key is not None) as pipe:
                    for channel, message, _ in batch:
                        pipe.execute_command(*self._publish_args(channel, message))
                    replies = await pipe.execute()
        except REDIS_FAILURES as exc:
            return exc
        if self._history_key is None:
            return [None] * len(batch)
        return [Offset.parse(reply) for reply in replies]

    async def _open_client(self) -> Client:
        """The command client, once the topology is known (raises while Redis cannot tell)."""
        if await self._topology.cluster():
            # One pool per node, MOVED and ASK followed; the history's key decides the slot of
            # every publish script, so a batch stays one MULTI on one node. No retries on a lost
            # connection, as below: a script whose reply was lost may have run, and running it
            # again would record the event twice under a new offset.
            return await self._topology.client(
                max_connections=self._max_connections, socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout, client_name=f"{self._name}:pub",
                retry=Retry(NoBackoff(), 0),
            )
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
            **self._tls,
        )
        return Redis(connection_pool=pool)

    def _publish_args(self, channel: str, message: bytes) -> tuple[Any, ...]:
        if self._history_key is None:
            return ("PUBLISH", channel, message)
        # EVAL, not EVALSHA: Redis caches the script by its hash anyway, and a restarted Redis
        # (empty script cache) then needs no NOSCRIPT dance in the middle of a MULTI.
        return (
            "EVAL", _PUBLISH_AND_RECORD, 1, self._history_key,
            channel, message, self._history_max, self._history_age_ms,
        )

    # --- history ------------------------------------------------------------------------------

    @property
    def position(self) -> Offset | None:
        return self._position

    @property
    def epoch(self) -> str | None:
        return self._epoch

    async def end(self) -> Offset:
        """The newest offset in the history (everything later arrives live)."""
        client = self._require_client()
        if self._history_key is None:
            raise BusUnavailable("this bus keeps no history")
        with _answered():
            newest = await client.xrevrange(self._history_key, count=1)
        return (Offset.parse(newest[0][0]) or ZERO) if newest else ZERO

    async def history(self, after: Offset, channels: Collection[str] | None) -> History:
        """Every entry after `after` on `channels` (None: all), in order; `complete` is False
        when the stream already trimmed something after `after` (too old, or too far back)."""
        client = self._require_client()
        if self._history_key is None:
            raise BusUnavailable("this bus keeps no history")
        wanted = None if channels is None else set(channels)
        entries: list[Entry] = []
        end = after
        with _answered():
            while True:
                chunk = await client.xrange(self._history_key, min=f"({end}", max="+", count=_READ_CHUNK) or []
                for raw_id, fields in chunk:
                    fields = fields or {}
                    offset = Offset.parse(raw_id)
                    if offset is None:
                        continue
                    end = offset
                    channel = _text(fields.get(b"c"))
                    if wanted is None or channel in wanted:
                        entries.append(Entry(offset, channel, _bytes(fields.get(b"m"))))
                if len(chunk) < _READ_CHUNK:
                    break
            # Checked after reading: anything trimmed meanwhile counts as lost too.
            complete = await self._nothing_trimmed_after(client, after)
        return History(entries, end, complete)

    async def _nothing_trimmed_after(self, client: Client, after: Offset) -> bool:
        """Trimming removes from the head: nothing after `after` is gone while `after` itself
        (always an id the stream once held) is still there, or while nothing was ever trimmed.
        Conservative at one point: `after` trimmed with its successor kept reads as a loss."""
        assert self._history_key is not None
        try:
            info = await client.xinfo_stream(self._history_key)
        except ResponseError:  # no such key: nothing was ever written, so nothing trimmed
            return True
        first = info.get("first-entry")
        if not first or info.get("entries-added") == info.get("length"):
            return True
        return (Offset.parse(first[0]) or ZERO) <= after

    async def remember(self, key: str, value: bytes, ttl: float) -> None:
        with _answered():
            await self._require_client().set(key, value, px=max(1, int(ttl * 1000)))

    async def recall(self, key: str) -> bytes | None:
        with _answered():
            value = await self._require_client().get(key)
        return _bytes(value) if value is not None else None

    async def set_field(self, key: str, field: str, value: str) -> bool:
        """Set a field of the hash at `key`; True when the field is new."""
        with _answered():
            return bool(await self._require_client().hset(key, field, value))

    async def delete_field(self, key: str, field: str) -> bool:
        """Delete a field of the hash at `key`; True when it was there."""
        with _answered():
            return bool(await self._require_client().hdel(key, field))

    async def fields(self, key: str) -> dict[str, str]:
        with _answered():
            found = await self._require_client().hgetall(key)
        return {_text(field): _text(value) for field, value in found.items()}

    def _require_client(self) -> Client:
        if self._client is None:
            raise BusUnavailable("the Redis bus is not running")
        return self._client

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> bool:
        """Hold `channel`. True once Redis confirmed it; False while Redis is unreachable (it is
        made on recovery); BusUnavailable when Redis is there but did not confirm in time."""
        self._wanted.add(channel)
        return await self._command("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        try:
            await self._command("unsubscribe", channel)
        except BusUnavailable as exc:  # the reconnect after a failure subscribes only what is wanted
            log.warning("%s", exc)

    async def _command(self, kind: str, channel: str) -> bool:
        conn = self._conn
        if conn is None:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault((kind, channel), deque())
        queue.append(waiter)
        try:
            if not await self._send(conn, kind.upper(), channel):
                return False
            return await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except REDIS_FAILURES as exc:
            raise BusUnavailable(f"Redis did not confirm {kind} {channel}: {exc or 'timed out'}") from None
        finally:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                self._waiters.pop((kind, channel), None)

    async def _send(self, conn: AbstractConnection, *args: str) -> bool:
        """Write a command on the subscriber connection; False if that connection is gone.

        Never on a connection the bus dropped (redis-py would silently reconnect it, and
        nobody would read that orphan subscriber), and never triggering a read: the reader
        task owns all reads.
        """
        async with self._send_lock:
            if conn is not self._conn or not conn.is_connected:
                return False
            await conn.send_command(*args, check_health=False)
            return True

    # --- consuming ----------------------------------------------------------------------------

    @property
    def unreachable_shards(self) -> list[str]:
        """On a cluster, the masters that did not answer the last PING ("host:port")."""
        return list(self._shards.unreachable) if self._shards is not None else []

    @property
    def ready(self) -> bool:
        return self._conn is not None and not self._initial and not self._holding and not self._owed

    async def _run(self) -> None:
        delay = self._backoff_min
        while True:
            try:
                await self._connect()
                delay = self._backoff_min
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except (*REDIS_FAILURES, BusUnavailable) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                problem = certificate_problem(exc)
                if problem is not None:
                    # Retrying helps only once Redis presents another certificate: say what to change.
                    log.error(
                        "Redis's TLS certificate could not be verified (%s); retrying in %.1fs. Set "
                        "REDIS_TLS_CA to the CA that signed it (REDIS_TLS_VERIFY=none encrypts without "
                        "verifying: a man in the middle can then read and forge every event)",
                        problem, delay,
                    )
                else:
                    log.warning("Redis subscriber lost (%s); retrying in %.1fs", self.last_error, delay)
            except Exception:  # keep the consumer alive whatever a bug throws
                self.last_error = "internal error"
                log.exception("Redis consumer failed; restarting it")
            await self._drop_connection()
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self._backoff_max)
            self.reconnects += 1

    async def _connect(self) -> None:
        if self._client is None:
            self._client = await self._open_client()
        owed = await self._owes_catch_up()
        conn = await self._subscriber()
        self._conn = conn
        self._generation += 1
        self._initial = set(self._wanted)
        # Nothing live is delivered until the history after our position has been.
        self._holding = self._owed = owed
        if self._initial:
            await self._send(conn, "SUBSCRIBE", *sorted(self._initial))
        self.last_error = None
        log.info("Redis subscriber connected; subscribing %d channels", len(self._initial))
        self._release_when_confirmed()

    async def _subscriber(self) -> AbstractConnection:
        """A connection for SUBSCRIBE: to REDIS_URL's node or, on a cluster, first to the master
        that owns the history's slot, where every publish script runs: its messages then reach
        us without a hop over the cluster bus, which costs a tail of tens of milliseconds
        (measured: W5's p99 31 ms against 3 ms). Then any node that answers (classic pub/sub
        reaches every node of a cluster)."""
        assert self._sub_pool is not None
        others = nodes_of(self._client) if self._client is not None else []
        owner = owner_of(self._client, self._history_key) if self._client is not None and self._history_key else None
        if owner is not None:
            others = sorted(others, key=lambda node: node != owner)
            candidates: list[dict[str, object]] = [{"host": host, "port": port} for host, port in others]
            candidates.append({})
        else:
            candidates = [{}, *({"host": host, "port": port} for host, port in others)]
        failure: BaseException | None = None
        for where in candidates:
            conn: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
            for attribute, value in where.items():
                setattr(conn, attribute, value)
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
            except REDIS_FAILURES as exc:
                await conn.disconnect(nowait=True)
                failure = exc
                continue
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            return conn
        assert failure is not None
        raise failure

    async def _owes_catch_up(self) -> bool:
        """Whether this (re)connect owes a catch-up; checks first whether Redis lost its data."""
        if self._history_key is None:
            return False
        if self._epoch_key is not None:
            client = self._require_client()
            mine = uuid.uuid4().hex
            previous = await client.set(self._epoch_key, mine, nx=True, get=True)
            self._epoch_before, self._epoch = self._epoch, _text(previous) if previous is not None else mine
        if self._position is None:
            # The process's first connection owes nothing: start at the end of the history.
            self._position = await self.end()
            return False
        if self._epoch_before is not None and self._epoch != self._epoch_before:
            # Redis lost its data (a restart without persistence): everything in its new
            # history is new to us, whatever its ids.
            self.epoch_changes += 1
            self._from_start = True
            log.warning("Redis lost its data since we last saw it (new epoch); replaying its whole history")
        return True

    async def _read_forever(self) -> None:
        assert self._conn is not None
        conn = self._conn
        pinged = False
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
            kind = reply[0]
            if kind == b"message":
                self._inbox.append((reply[1].decode(), reply[2]))
                self._inbox_ready.set()
            elif kind in (b"subscribe", b"unsubscribe"):
                self._confirm(kind.decode(), reply[1].decode())
                self._release_when_confirmed()

    def _release_when_confirmed(self) -> None:
        if self._holding and not self._initial:
            self._holding = False
            self._inbox_ready.set()  # the deliverer catches up, then goes live

    async def _deliver_forever(self) -> None:
        assert self._handler is not None
        handler = self._handler
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            if self._holding:
                continue
            if self._owed and not await self._catch_up():
                continue
            inbox = self._inbox
            while inbox and not self._holding and not self._owed:
                channel, message = inbox.popleft()
                offset = offset_of(message)
                if offset is not None:
                    if self._position is not None and offset <= self._position:
                        self.deduplicated += 1  # already delivered by the catch-up
                        continue
                    self._advance(offset)
                if channel != self._sync_channel:
                    await dispatch(handler, channel, message, offset)

    async def _catch_up(self) -> bool:
        """Deliver what was published after our position on the channels held; False to retry."""
        assert self._handler is not None and self._on_gap is not None
        since = ZERO if self._from_start else (self._position or ZERO)
        generation = self._generation
        try:
            # Every channel: one confirmed while this runs must get its entries too.
            history = await self.history(since, None)
        except BusUnavailable as exc:
            log.warning("catching up from %s failed (%s); retrying", since, exc)
            asyncio.get_running_loop().call_later(self._backoff_min, self._inbox_ready.set)
            return False
        replayed = 0
        for entry in history.entries:
            self._advance(entry.offset)
            if entry.channel in self._confirmed and entry.channel != self._sync_channel:
                replayed += 1
                await dispatch(self._handler, entry.channel, entry.message, entry.offset)
        self.replayed += replayed
        self._advance(history.end)
        self._from_start = False
        if generation == self._generation:
            self._owed = False  # else another gap began meanwhile: catch up again from here
        log.info("Redis subscriber caught up from %s: %d replayed", since, replayed)
        if not history.complete:
            self.gaps += 1
            log.error(
                "events after %s were trimmed from the history before this instance could read "
                "them (outage longer than the retention); its sockets are told", since,
            )
            await self._on_gap("gap")
        self._inbox_ready.set()
        return True

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
        self._confirmed.clear()
        self._initial.clear()
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(False)
        if conn is not None:
            await conn.disconnect(nowait=True)

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cluster": self._topology.known,  # None until Redis has told (or REDIS_CLUSTER did)
            "unreachable_shards": self.unreachable_shards,
            "connected": self._conn is not None,
            "channels": len(self._confirmed),
            "wanted": len(self._wanted),
            "position": str(self._position) if self._position is not None else None,
            "reconnects": self.reconnects,
            "replayed": self.replayed,
            "deduplicated": self.deduplicated,
            "gaps": self.gaps,
            "epoch_changes": self.epoch_changes,
            "last_error": self.last_error,
        }


@contextmanager
def _answered() -> Iterator[None]:
    """A Redis call that failed or timed out becomes BusUnavailable."""
    try:
        yield
    except REDIS_FAILURES as exc:
        raise BusUnavailable(f"Redis did not answer: {exc}") from None


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value or "").encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")

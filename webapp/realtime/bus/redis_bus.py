"""Redis pub/sub for live delivery, and a Redis Stream per partition as the history that gives
every event an offset.

Publishing runs one script call per partition and batch (per SCRIPT_BATCH_MAX messages of a
larger one): for each message, XADD to the partition's history stream (the entry id is the
event's offset), then PUBLISH (one node) or SPUBLISH (a cluster) the envelope with the offset
spliced in as its first field; last, trim the stream by count and age. Pub/sub on one
connection keeps the server's execution order, so live messages arrive in offset order within
a partition; after any gap a subscriber reads its partitions' streams from the last offsets
consumed, then drops live messages at or below them: exactly once, in order, no clock involved.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, ResponseError

from .base import (
    ZERO,
    BusUnavailable,
    Entry,
    GapHandler,
    History,
    Mark,
    MessageHandler,
    Offset,
    Position,
    cancel,
    dispatch,
)
from .cluster import REDIS_FAILURES, Client, ShardWatch, Topology
from .partitions import CLUSTER_PARTITIONS, Partitions
from .subscriber import Node, Subscriber
from .tls import TlsOptions, log_failure

log = logging.getLogger(__name__)

# KEYS[1] history stream; ARGV: max length, max age in ms, PUBLISH or SPUBLISH, then a channel
# and an envelope per message. Returns their offsets, in order. A script is atomic: the history
# and the live messages can never disagree. One script for a batch, not one per message in a
# MULTI: the client packs one command and parses one reply instead of N + 2 of each.
# On a cluster each channel carries the stream's hash tag: Redis refuses a script that would
# publish on a shard channel of another slot.
_PUBLISH_AND_RECORD = """
local ids = {}
for i = 4, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'c', ARGV[i], 'm', ARGV[i + 1])
  local message = ARGV[i + 1]
  if string.byte(message, 1) == 123 and string.byte(message, 2) == 34 then
    message = '{"offset":"' .. id .. '",' .. string.sub(message, 2)
  end
  redis.call(ARGV[3], ARGV[i], message)
  ids[#ids + 1] = id
end
local ms = tonumber(string.match(ids[#ids], '^%d+'))
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d-0', ms - tonumber(ARGV[2])))
return ids
"""
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_AND_RECORD.encode()).hexdigest()
# Redis runs a script to its end before any other client's command: a batch is cut into script
# calls of at most this many messages, sent one after another, and other clients' commands run
# between them (0.7 to 1.7 ms of Redis per call of 128 on the machines in docs/scaling.md).
SCRIPT_BATCH_MAX = 128
_OFFSET_MARK = b'{"offset":"'
_READ_CHUNK = 1000
# A live offset far ahead of Redis's clock is forged (anyone can publish on our channels):
# trusting it would make the seam drop every real message after it. Compared with Redis's clock
# (`RedisBus.clock_ms`), never ours: an instance whose clock runs behind Redis's would take
# every real offset for a forged one, deliver without moving its position, and replay
# everything it had delivered at the next catch-up.
_MAX_CLOCK_SKEW_MS = 60_000


def offset_of(message: bytes, now_ms: float) -> Offset | None:
    """The offset the publish script spliced into a live message, if it is there and sane:
    not past `now_ms` (Redis's clock, as stream ids count) by more than a minute."""
    if not message.startswith(_OFFSET_MARK):
        return None
    start = len(_OFFSET_MARK)
    stop = message.find(b'"', start, start + 40)
    offset = Offset.parse(message[start:stop]) if stop > 0 else None
    if offset is None or offset.ms > now_ms + _MAX_CLOCK_SKEW_MS:
        return None
    return offset


class RedisBus:
    """Redis pub/sub and histories, on one node or a Redis Cluster.

    Publishing goes through one queue and one sender per partition: concurrent publishes travel
    together, and a shard that hangs delays only the partitions it owns. On
    a cluster, channels are spread over partitions (`bus/partitions.py`), each in one slot: a
    publish touches only the shard that owns its channel, and the instance holds one subscriber
    connection per shard it needs (`bus/subscriber.py`), following the channels when a failover
    or a reshard moves their slots.
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
        partitions: int = CLUSTER_PARTITIONS,
        inbox_max_messages: int = 10_000,
        inbox_max_bytes: int = 16 * 1024 * 1024,
        script_by_hash: bool = True,  # False sends the script's text with every publish (the bench compares)
    ) -> None:
        self._url = url
        self._tls: TlsOptions = tls or {}
        # One node or a cluster: asked of Redis at the first connection unless REDIS_CLUSTER says.
        self._topology = topology or Topology(url, forced=None, timeout=timeout, tls=tls)
        # Named connections: `CLIENT LIST` shows which instance each belongs to.
        self._name = re.sub(r"[^A-Za-z0-9_.:-]", "_", name)[:100]
        self.timeout = timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.idle_ping = idle_ping
        self._max_connections = max_connections
        self._history_key = history_key
        self._history_max = history_max
        self._history_age_ms = int(history_age * 1000)
        self._epoch_key = epoch_key
        self.sync_channel = sync_channel
        self._cluster_partitions = partitions
        self._by_hash = script_by_hash
        # Each subscriber's inbox: past either bound, live messages are read from the history.
        self.inbox_max_messages = inbox_max_messages
        self.inbox_max_bytes = inbox_max_bytes
        # One partition until Redis says it is a cluster.
        self._parts = Partitions(history_key or "", 1)
        self._queued_marker: asyncio.Future[Mark | None] | None = None  # a sync marker not sent yet
        self._syncs: list[tuple[Mark, asyncio.Future[Position]]] = []
        self._wanted: set[str] = set()
        self._placed: dict[str, Subscriber] = {}  # each wanted channel: the subscriber holding it
        self._subscribers: dict[Node, Subscriber] = {}
        self._held_in: dict[int, int] = {}  # partition -> wanted channels in it
        self._starting: dict[int, asyncio.Future[None]] = {}  # partitions taken up, moving to their end
        self._slots: list[tuple[int, int, Node]] = []  # a cluster's slot ranges and their masters
        self._reroute = asyncio.Event()
        self.handler: MessageHandler | None = None
        self._on_gap: GapHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._booted = False
        self._client: Client | None = None  # made at the first connection, once the topology is known
        self._sub_pool: ConnectionPool | None = None
        self._shards: ShardWatch | None = None  # on a cluster: which masters do not answer
        self._outgoing: dict[int, _Outgoing] = {}  # each partition's queue and sender
        self._position: Position | None = None  # the offsets consumed; None before the first connection
        self._epoch: str | None = None
        self._skew_ms = 0.0  # Redis's clock minus ours, as TIME said at the last boot
        self.reconnects = 0
        self.replayed = 0
        self.deduplicated = 0
        self.gaps = 0
        self.overflows = 0  # times an inbox reached its bound
        self.shed = 0  # live messages left to the history meanwhile
        self.epoch_changes = 0
        self.moved_channels = 0  # followed to another shard after a failover or a reshard
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, handler: MessageHandler, on_gap: GapHandler) -> None:
        self.handler, self._on_gap = handler, on_gap
        if self.sync_channel is not None and self._history_key is not None:
            self._wanted.add(self.sync_channel)
        # RESP2 on subscribers: their replies are plain arrays the reader parses itself (RESP3
        # would route them to push handlers instead).
        self._sub_pool = ConnectionPool.from_url(
            self._url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            protocol=2,
            client_name=f"{self._name}:sub",
            **self._tls,
        )
        self._shards = ShardWatch(lambda: self._client, timeout=self.timeout)
        self._shards.start()
        self._tasks = [asyncio.create_task(self._boot(), name="redis-bus-boot")]

    async def close(self) -> None:
        if self._shards is not None:
            await self._shards.close()
        for task in self._tasks:
            await cancel(task)
        self._tasks = []
        for queue in self._outgoing.values():
            await cancel(queue.task)
            for _, _, done in queue.messages:
                if not done.done():
                    done.set_exception(BusUnavailable("the Redis bus closed"))
        self._outgoing = {}
        for subscriber in self._subscribers.values():
            await subscriber.close()
        self._subscribers.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._sub_pool is not None:
            await self._sub_pool.disconnect()
            self._sub_pool = None

    async def _boot(self) -> None:
        """Learn the topology, the epoch and where the histories end, then hold what is wanted."""
        delay = self.backoff_min
        while True:
            try:
                if self._client is None:
                    self._client = await self._open_client()
                    if isinstance(self._client, RedisCluster):
                        self._parts = Partitions(
                            self._history_key or "{webapp}:replay", self._cluster_partitions, sharded=True
                        )
                await self.lost_its_data()
                await self.read_clock()
                # The process's first connection owes nothing: it starts at the ends of the histories.
                self._position = await self.end() if self.has_history else Position()
                if self.sharded:
                    await self._read_slots()
                break
            except asyncio.CancelledError:
                raise
            except (*REDIS_FAILURES, BusUnavailable) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log_failure(log, "Redis not reached", exc, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.backoff_max)
            self.reconnects += 1
        self._booted = True
        if not self.sharded:
            self._subscriber_for("")  # the one connection, whatever it holds
        for channel in sorted(self._wanted):
            self._count(channel, +1)
            subscriber = self._subscriber_for(channel)
            if subscriber is not None:
                subscriber.wanted.add(channel)  # subscribed when its connection is made
                self._placed[channel] = subscriber
        for subscriber in self._subscribers.values():
            subscriber.start()
        if self.sharded:
            self._tasks.append(asyncio.create_task(self._route_forever(), name="redis-bus-router"))

    # --- where channels live ------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        return self._parts.sharded

    @property
    def partitions(self) -> int:
        return self._parts.count

    def partition_of(self, channel: str) -> int:
        return self._parts.of(channel)

    def wire(self, channel: str) -> str:
        return self._parts.wire(channel)

    def unwire(self, name: str) -> tuple[str, int] | None:
        return self._parts.unwire(name)

    def _subscriber_for(self, channel: str) -> Subscriber | None:
        """The subscriber of the node that owns the channel, made if needed (not started);
        None while no node owns its slot (a shard wholly down)."""
        node: Node = None
        if self.sharded:
            node = self._owner(key_slot(self.wire(channel).encode()))
            if node is None:
                return None
        subscriber = self._subscribers.get(node)
        if subscriber is None:
            subscriber = self._subscribers[node] = Subscriber(self, node)
        return subscriber

    def _owner(self, slot: int) -> Node:
        for low, high, node in self._slots:
            if low <= slot <= high:
                return node
        return None

    async def _read_slots(self) -> None:
        """The slot map, from the first node that answers (a dead shard's nodes do not)."""
        client = self._require_client()
        assert isinstance(client, RedisCluster)
        failure: BaseException | None = None
        for node in client.get_nodes():
            try:
                async with asyncio.timeout(self.timeout):
                    found: dict[tuple[int, int], dict[str, Any]] = await client.cluster_slots(target_nodes=node)  # type: ignore[assignment]
            except (*REDIS_FAILURES, TimeoutError) as exc:
                failure = exc
                continue
            self._slots = sorted(
                (int(low), int(high), (str(about["primary"][0]), int(about["primary"][1])))
                for (low, high), about in found.items()
            )
            return
        raise BusUnavailable(f"no node of the cluster told its slots: {failure}")

    async def connect_subscriber(self, node: Node) -> AbstractConnection:
        """A new subscriber connection to `node` (REDIS_URL's own for None); raises what redis-py raises."""
        assert self._sub_pool is not None
        conn: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
        if node is not None:
            conn.host, conn.port = node  # type: ignore[attr-defined]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

    def lost(self, subscriber: Subscriber) -> None:
        """A subscriber's connection failed: on a cluster its node may be gone for good."""
        if self.sharded:
            self._reroute.set()

    def moved(self, subscriber: Subscriber) -> None:
        """Redis dropped a channel on a subscriber's node unasked: its slot moved."""
        self._reroute.set()

    async def _route_forever(self) -> None:
        """On a cluster: follow slots that moved (a failover or a reshard) and retry channels
        whose shard was down, from a fresh read of the slot map. A node can tell us a channel
        left before every node agrees where it went: the map is then read again until it does."""
        delay = self.backoff_min
        while True:
            unplaced = any(channel not in self._placed for channel in self._wanted)
            try:
                await asyncio.wait_for(self._reroute.wait(), timeout=1.0 if unplaced else None)
            except TimeoutError:
                pass
            self._reroute.clear()
            try:
                await self._read_slots()
                settled = await self._rebalance()
            except BusUnavailable as exc:
                log.warning("reading the cluster's slots failed (%s); retrying in %.1fs", exc, delay)
                settled = False
            if settled:
                delay = self.backoff_min
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            self._reroute.set()

    async def _rebalance(self) -> bool:
        """Hold every wanted channel on the subscriber of its slot's owner; False while some
        channel Redis moved away still has its old owner in the map (read too early)."""
        moves: dict[Subscriber, list[str]] = {}
        settled = True
        for channel in sorted(self._wanted):
            target = self._subscriber_for(channel)
            current = self._placed.get(channel)
            if target is not None and target is current and channel in current.displaced:
                # Moved away, says the node; still there, says the map: read too early, or the
                # slot came back. Subscribed there again: a MOVED answer says which.
                current.forget(channel)
                moves.setdefault(current, []).append(channel)
                settled = False
                continue
            if target is None or target is current:
                continue
            if current is not None:
                current.forget(channel)
            self._placed[channel] = target
            moves.setdefault(target, []).append(channel)
            self.moved_channels += current is not None
        for target, channels in moves.items():
            log.info("holding %d channels on %s now", len(channels), target.name)
            await target.adopt(channels)
            if not target.connected and not target.started:
                target.start()
        for node, subscriber in list(self._subscribers.items()):
            if not subscriber.wanted:
                del self._subscribers[node]
                await subscriber.close()
        return settled

    def _count(self, channel: str, change: int) -> bool:
        """Count a wanted channel in (or out of) its partition; True when the partition was empty."""
        partition = self._parts.of(channel)
        before = self._held_in.get(partition, 0)
        if before + change:
            self._held_in[partition] = before + change
        else:
            self._held_in.pop(partition, None)
        return before == 0

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> Mark | None:
        """Hand a message to Redis; raises BusUnavailable when Redis did not confirm it.

        Concurrent publishes are sent together: one round trip per partition (one script call
        per SCRIPT_BATCH_MAX messages when there is a history), one pooled connection per batch
        instead of per message. Order is kept within each partition (one queue, one sender per
        partition, each batch sent once the one before it answered).
        """
        if self._client is None or not self._booted:
            raise BusUnavailable("Redis has not been reached yet")
        done: asyncio.Future[Mark | None] = asyncio.get_running_loop().create_future()
        self._enqueue(channel, message, done)
        return await done

    async def sync(self) -> Position:
        """The position once everything published until now on this instance's own channel
        has been consumed here.

        A marker on that channel goes through the history like any event; once the deliverer
        passes it, nothing published before it on its partition is still on its way. Callers
        share a marker that is still waiting to be sent: a drain costs one, not one per socket.
        """
        if self.sync_channel is None or not self.has_history:
            return self.position_now()
        if self._client is None or not self._booted:
            raise BusUnavailable("the Redis bus is not running")
        sent = self._queued_marker
        if sent is None:
            sent = self._queued_marker = asyncio.get_running_loop().create_future()
            self._enqueue(self.sync_channel, b'{"sync":1}', sent)
        marker = await asyncio.shield(sent)
        if marker is None or self.position_now().covers(marker):
            return self.position_now()
        reached: asyncio.Future[Position] = asyncio.get_running_loop().create_future()
        self._syncs.append((marker, reached))
        try:
            return await asyncio.wait_for(reached, self.timeout)
        except TimeoutError:
            raise BusUnavailable("this instance did not consume its sync marker in time") from None
        finally:
            self._syncs = [(m, f) for m, f in self._syncs if f is not reached]

    def advance(self, mark: Mark) -> bool:
        """Record a consumed message; False when it was consumed before (a duplicate)."""
        if self._position is None:
            self._position = Position()
        if not self._position.advance(mark):
            return False
        if self._syncs:
            for marker, reached in self._syncs:
                if not reached.done() and self._position.covers(marker):
                    reached.set_result(self._position.copy())
        return True

    def rewind(self, partitions: Collection[int]) -> None:
        """Forget the offsets of partitions whose history Redis lost: all of it is new."""
        old = self.position_now()
        self._position = Position({p: old.at(p) for p in old.partitions() if p not in partitions})

    def _enqueue(self, channel: str, message: bytes, done: asyncio.Future[Mark | None]) -> None:
        """Queue a message on its partition's sender, started at its first message."""
        partition = self._parts.of(channel)
        queue = self._outgoing.get(partition)
        if queue is None:
            queue = self._outgoing[partition] = _Outgoing()
            queue.task = asyncio.create_task(self._send_forever(partition, queue), name=f"redis-bus-publisher-{partition}")
        queue.messages.append((channel, message, done))
        queue.ready.set()

    async def _send_forever(self, partition: int, queue: _Outgoing) -> None:
        """Send one partition's messages, in order, each batch once the one before it answered.

        One sender per partition, not one for all: a shard that hangs (a stopped process, a
        black-holed network: no refusal, just silence) holds each call to it for REDIS_TIMEOUT,
        and only the partitions it owns wait behind that; the others' batches go on."""
        while True:
            await queue.ready.wait()
            queue.ready.clear()
            while queue.messages:
                batch, queue.messages = queue.messages, []
                if any(done is self._queued_marker for _, _, done in batch):
                    self._queued_marker = None  # taken: a later sync needs a marker of its own
                replies = await self._send_group(batch)
                for (_, _, done), reply in zip(batch, replies, strict=True):
                    if done.done():
                        continue
                    if isinstance(reply, Exception):
                        done.set_exception(BusUnavailable(f"Redis did not confirm the publish: {reply}"))
                    elif self.has_history:
                        offset = Offset.parse(reply)
                        done.set_result(Mark(partition, offset) if offset is not None else None)
                    else:
                        done.set_result(None)

    async def _send_group(self, group: list[tuple[str, bytes, asyncio.Future[Mark | None]]]) -> list[Any]:
        """Publish messages of one partition: per message, its reply or what went wrong.

        With a history, SCRIPT_BATCH_MAX messages per script call at most, each call sent once
        the one before it answered: a call runs whole or not at all (NOSCRIPT included), so the
        offsets keep the publish order. A call that fails fails the ones after it, unsent."""
        size = SCRIPT_BATCH_MAX if self.has_history else max(1, len(group))
        replies: list[Any] = []
        for start in range(0, len(group), size):
            part = group[start : start + size]
            try:
                try:
                    replies += await self._run_group(part, by_hash=self._by_hash)
                except NoScriptError:
                    # Nothing ran: this node's script cache is empty (a restart, a failover). Once
                    # more with the script's text, which caches it there.
                    replies += await self._run_group(part, by_hash=False)
            except Exception as exc:  # noqa: BLE001 - any failure fails the batch, never the sender
                # Not only Redis's errors: uvloop raises RuntimeError for a write on a connection
                # the peer reset, and a sender that died left every later publish waiting forever.
                if not isinstance(exc, REDIS_FAILURES):
                    log.warning("publishing a batch failed (%s: %s); its callers are told", type(exc).__name__, exc)
                return replies + [exc] * (len(group) - len(replies))
        return replies

    async def _run_group(self, group: list[tuple[str, bytes, asyncio.Future[Mark | None]]], *, by_hash: bool) -> list[Any]:
        assert self._client is not None
        if self.has_history:
            return list(await self._client.execute_command(*self._script_args(group, by_hash)))
        verb = "SPUBLISH" if self.sharded else "PUBLISH"
        if len(group) == 1:
            channel, message, _ = group[0]
            return [await self._client.execute_command(verb, self.wire(channel), message)]
        # Without a history a publish names no key: a plain pipeline (a cluster could not run
        # these in a MULTI or a script).
        async with self._client.pipeline(transaction=False) as pipe:
            for channel, message, _ in group:
                pipe.execute_command(verb, self.wire(channel), message)
            return list(await pipe.execute())

    async def _open_client(self) -> Client:
        """The command client, once the topology is known (raises while Redis cannot tell)."""
        if await self._topology.cluster():
            # One pool per node, MOVED and ASK followed; every key a script touches
            # carries one partition's hash tag. No retries on a lost connection, as below: a
            # script whose reply was lost may have run, and running it again would record the
            # event twice under a new offset.
            return await self._topology.client(
                max_connections=self._max_connections, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout, client_name=f"{self._name}:pub",
                retry=Retry(NoBackoff(), 0),
            )
        # Publishing borrows from a blocking pool so a burst waits for a connection instead of
        # failing. No retries: a batch whose reply was lost may have been applied, and sending
        # it again would duplicate it; the pool already replaces connections that died.
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._max_connections,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=f"{self._name}:pub",
            **self._tls,
        )
        return Redis(connection_pool=pool)

    def _script_args(self, group: list[tuple[str, bytes, asyncio.Future[Mark | None]]], by_hash: bool) -> list[Any]:
        """The script's command for a batch of one partition's messages."""
        # By hash: Redis need not read and hash the script's text on every publish.
        script = ("EVALSHA", _PUBLISH_SHA) if by_hash else ("EVAL", _PUBLISH_AND_RECORD)
        args: list[Any] = [
            *script, 1, self._parts.stream(self._parts.of(group[0][0])),
            self._history_max, self._history_age_ms, "SPUBLISH" if self.sharded else "PUBLISH",
        ]
        for channel, message, _ in group:
            args += (self.wire(channel), message)
        return args

    # --- history ------------------------------------------------------------------------------

    @property
    def has_history(self) -> bool:
        return self._history_key is not None

    @property
    def position(self) -> Position | None:
        return None if self._position is None else self._position.copy()

    def position_now(self) -> Position:
        return Position() if self._position is None else self._position.copy()

    @property
    def epoch(self) -> str | None:
        return self._epoch

    async def lost_its_data(self) -> bool:
        """Read the epoch (set once per Redis data set); True when it changed since last read:
        Redis lost its data (a restart without persistence), and on one node everything in its
        new history is new to us, whatever its ids. (On a cluster the epoch lives on one shard,
        and a shard restarting empty has a replica to take over: a change is only counted.)"""
        if self._epoch_key is None or not self.has_history:
            return False
        client = self._require_client()
        mine = uuid.uuid4().hex
        with _answered():
            previous = await client.set(self._epoch_key, mine, nx=True, get=True)
        before, self._epoch = self._epoch, _text(previous) if previous is not None else mine
        if before is None or before == self._epoch:
            return False
        self.epoch_changes += 1
        if self.sharded:
            log.warning("the epoch of the cluster's data changed: a shard lost its data")
            return False
        log.warning("Redis lost its data since we last saw it (new epoch); replaying its whole history")
        return True

    async def read_clock(self) -> None:
        """Learn how far Redis's clock is from ours: stream ids are Redis milliseconds. Read at
        boot and at every subscriber reconnect (Redis may have restarted on another host, or
        either clock been stepped)."""
        client = self._require_client()
        before = time.time()
        with _answered():
            answer: Any = await client.time()
        if isinstance(answer, dict):  # a cluster may answer per node: any one will do
            answer = next(iter(answer.values()))
        seconds, micros = answer
        self._skew_ms = (int(seconds) + int(micros) / 1e6 - (before + time.time()) / 2) * 1000

    def clock_ms(self) -> int:
        """Redis's clock now, as an offset's milliseconds count it (estimated while Redis is away)."""
        return int(time.time() * 1000 + self._skew_ms)

    async def end(self, partitions: Collection[int] | None = None) -> Position:
        """The newest offset of every partition's history, or of `partitions` (everything later
        arrives live)."""
        client = self._require_client()
        if not self.has_history:
            raise BusUnavailable("this bus keeps no history")
        chosen = sorted(partitions) if partitions is not None else list(range(self._parts.count))
        streams = [self._parts.stream(p) for p in chosen]
        with _answered():
            if len(streams) == 1:
                newest = [await client.xrevrange(streams[0], count=1)]
            else:
                async with client.pipeline(transaction=False) as pipe:
                    for stream in streams:
                        pipe.xrevrange(stream, count=1)
                    newest = await pipe.execute()
        return Position({
            p: (Offset.parse(found[0][0]) or ZERO) if found else ZERO for p, found in zip(chosen, newest, strict=True)
        })

    async def history(self, after: Position, channels: Collection[str] | None) -> History:
        """Every entry after `after` on `channels` (None: all), in order within each partition;
        `complete` is False when a stream already trimmed something after `after` (too old, or
        too far back)."""
        partitions = range(self._parts.count) if channels is None else {self._parts.of(c) for c in channels}
        return await self.read(after, partitions, None if channels is None else set(channels))

    async def read(
        self, after: Position, partitions: Collection[int], wanted: set[str] | None, limit: int | None = None
    ) -> History:
        """What `history` reads, partition by partition, all at once; with `limit`, at most that
        many entries of each partition (whatever their channel), `more` telling whether a
        partition may hold more: a reader pages through a long history in bounded memory."""
        if not self.has_history:
            raise BusUnavailable("this bus keeps no history")
        chosen = sorted(partitions)
        read = await asyncio.gather(*(self._read_partition(p, after.at(p), wanted, limit) for p in chosen))
        end = after.copy()
        entries: list[Entry] = []
        complete, more = True, False
        for partition, (found, last, whole, full) in zip(chosen, read, strict=True):
            entries.extend(found)
            end.advance(Mark(partition, last))
            complete = complete and whole
            more = more or full
        if len(chosen) > 1:
            entries.sort(key=lambda entry: entry.mark.offset)  # about publish order across partitions
        return History(entries, end, complete, more)

    async def _read_partition(
        self, partition: int, after: Offset, wanted: set[str] | None, limit: int | None = None
    ) -> tuple[list[Entry], Offset, bool, bool]:
        client = self._require_client()
        stream = self._parts.stream(partition)
        entries: list[Entry] = []
        end = after
        left = limit
        with _answered():
            while True:
                count = _READ_CHUNK if left is None else min(_READ_CHUNK, left)
                chunk = await client.xrange(stream, min=f"({end}", max="+", count=count) or []
                for raw_id, fields in chunk:
                    fields = fields or {}
                    offset = Offset.parse(raw_id)
                    if offset is None:
                        continue
                    end = offset
                    named = self._parts.unwire(_text(fields.get(b"c")))
                    if named is not None and (wanted is None or named[0] in wanted):
                        entries.append(Entry(Mark(partition, offset), named[0], _bytes(fields.get(b"m"))))
                if left is not None:
                    left -= len(chunk)
                if len(chunk) < count or left == 0:
                    break
            # Checked after reading: anything trimmed meanwhile counts as lost too.
            complete = await self._nothing_trimmed_after(client, stream, after)
        return entries, end, complete, left == 0

    async def _nothing_trimmed_after(self, client: Client, stream: str, after: Offset) -> bool:
        """Trimming removes from the head: nothing after `after` is gone while `after` itself
        (always an id the stream once held) is still there, or while nothing was ever trimmed.
        Conservative at one point: `after` trimmed with its successor kept reads as a loss."""
        try:
            info = await client.xinfo_stream(stream)
        except ResponseError:  # no such key: nothing was ever written, so nothing trimmed
            return True
        first = info.get("first-entry")
        if not first or info.get("entries-added") == info.get("length"):
            return True
        return (Offset.parse(first[0]) or ZERO) <= after

    async def deliver(self, channel: str, message: bytes, mark: Mark | None) -> None:
        """Hand one consumed message to the handler (a bug there must not stop consumption)."""
        assert self.handler is not None
        await dispatch(self.handler, channel, message, mark)

    def offset_in(self, message: bytes) -> Offset | None:
        return offset_of(message, self.clock_ms()) if self.has_history else None

    async def on_gap(self, reason: str) -> None:
        assert self._on_gap is not None
        await self._on_gap(reason)

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
        """Hold `channel`. True once Redis confirmed it; False while Redis (or, on a cluster,
        the channel's shard) is unreachable: it is made on recovery; BusUnavailable when Redis
        is there but did not confirm in time."""
        if channel in self._wanted:
            subscriber = self._placed.get(channel)
            return subscriber is not None and channel in subscriber.confirmed
        self._wanted.add(channel)
        if not self._booted:
            return False
        partition = self._parts.of(channel)
        if self._count(channel, +1) and self.sharded and self.has_history:
            started = self._starting[partition] = asyncio.get_running_loop().create_future()
            try:
                await self._start_partition_at_its_end(partition)
            finally:
                started.set_result(None)
                del self._starting[partition]
        elif partition in self._starting:
            # Its first channel is still moving the position to the stream's end: a channel
            # held meanwhile could deliver messages that move would then drop.
            await asyncio.shield(self._starting[partition])
        subscriber = self._subscriber_for(channel)
        if subscriber is None:
            return False  # the router retries once a node owns the slot
        self._placed[channel] = subscriber
        if not subscriber.started:
            # A shard not held so far: its connection first. Answering before it is made would
            # accept a socket whose events published meanwhile reach nobody. (Wanted from now
            # on: the router closes subscribers that want nothing.)
            subscriber.wanted.add(channel)
            subscriber.start()
            try:
                await asyncio.wait_for(subscriber.tried.wait(), self.timeout)
            except TimeoutError:
                pass
        return await subscriber.hold(channel)

    async def _start_partition_at_its_end(self, partition: int) -> None:
        """A partition nothing here held: what it recorded meanwhile is no concern of ours, and a
        later catch-up must not replay it to sockets that came after."""
        client = self._require_client()
        try:
            with _answered():
                newest = await client.xrevrange(self._parts.stream(partition), count=1)
        except BusUnavailable:
            return  # its shard is down: the catch-up after it comes back starts where we were
        offset = Offset.parse(newest[0][0]) if newest else None
        if offset is not None:
            self.advance(Mark(partition, offset))

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        if self._booted:  # before, nothing was counted: the boot counts what is wanted then
            self._count(channel, -1)
        subscriber = self._placed.pop(channel, None)
        if subscriber is not None:
            await subscriber.release(channel)

    # --- state --------------------------------------------------------------------------------

    @property
    def unreachable_shards(self) -> list[str]:
        """On a cluster, the masters that did not answer the last PING ("host:port")."""
        return list(self._shards.unreachable) if self._shards is not None else []

    @property
    def ready(self) -> bool:
        """Every subscriber connected and caught up, but those of shards known to be down."""
        if not self._booted:
            return False
        down = set(self.unreachable_shards)
        return all(s.ready or s.name in down for s in self._subscribers.values())

    def status(self) -> dict[str, Any]:
        subscribers = list(self._subscribers.values())
        return {
            "kind": self.kind,
            "cluster": self._topology.known,  # None until Redis has told (or REDIS_CLUSTER did)
            "partitions": self._parts.count,
            "unreachable_shards": self.unreachable_shards,
            "connected": bool(subscribers) and all(s.connected for s in subscribers),
            "subscribers": len(subscribers),
            "channels": sum(len(s.confirmed) for s in subscribers),
            "wanted": len(self._wanted),
            "position": str(self._position) if self._position is not None else None,
            "reconnects": self.reconnects,
            "replayed": self.replayed,
            "deduplicated": self.deduplicated,
            "gaps": self.gaps,
            "overflows": self.overflows,
            "shed": self.shed,
            "epoch_changes": self.epoch_changes,
            "moved_channels": self.moved_channels,
            "last_error": self.last_error,
        }


class _Outgoing:
    """One partition's messages waiting to be published, and the task that sends them."""

    __slots__ = ("messages", "ready", "task")

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, asyncio.Future[Mark | None]]] = []
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


@contextmanager
def _answered() -> Iterator[None]:
    """A Redis call that failed or timed out becomes BusUnavailable."""
    try:
        yield
    except REDIS_FAILURES as exc:
        raise BusUnavailable(f"Redis did not answer: {exc}") from None
    except RuntimeError as exc:
        # uvloop's answer to a write on a connection the peer reset ("unable to perform
        # operation on <TCPTransport closed=True>"): a handshake once hung on it, unanswered.
        if "closed" not in str(exc):
            raise
        raise BusUnavailable(f"Redis did not answer: {exc}") from None


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value or "").encode()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")

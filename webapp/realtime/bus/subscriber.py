"""One subscriber connection to one Redis node, and the channels the instance holds there.

One task reads the connection and only parses replies: subscription confirmations are handled
as they arrive, never stuck behind a backlog of deliveries. Another delivers. Between them, an
inbox bounded in messages and bytes (INBOX_MAX_MESSAGES, INBOX_MAX_BYTES): past the bound the
reader stops queueing live messages (they are in the history already), and once the deliverer
has emptied the inbox it reads them from the history, a page at a time, from its position;
what the history no longer holds is reported as a gap. Memory stays bounded however far
delivery falls behind. The channels the
instance wants here are the truth: after any reconnect all of them are subscribed again, then
the history of their partitions is read from the instance's position before anything live is
delivered. One Redis node has one such connection; a cluster one per shard that owns a channel
the instance holds (SSUBSCRIBE reaches only the shard that owns the channel's slot).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from .base import BusUnavailable, Mark
from .cluster import REDIS_FAILURES
from .tls import log_failure

if TYPE_CHECKING:
    from .redis_bus import RedisBus

log = logging.getLogger(__name__)

Node = tuple[str, int] | None  # a cluster node; None for REDIS_URL's own node
# Entries of each partition a catch-up reads and delivers at a time: its memory stays bounded
# however long the history it reads.
CATCH_UP_PAGE = 1000
_OVERFLOW_LOG_EVERY = 5.0  # seconds between two warnings of an overflowing inbox
# Messages delivered between two yields to the event loop: a delivery that never waits (most
# do not) would otherwise hold the loop for a whole backlog, seconds of it, and with it REST
# calls, heartbeats, subscription confirmations and the reader that enforces the inbox's bound.
_YIELD_EVERY = 64


class Subscriber:
    """The channels held on one node: subscribed, consumed in order, caught up after gaps."""

    def __init__(self, bus: RedisBus, node: Node) -> None:
        self.bus = bus
        self.node = node
        self.wanted: set[str] = set()
        self.confirmed: set[str] = set()
        self.displaced: set[str] = set()  # wanted, but Redis moved them away from this node
        self._initial: set[str] = set()  # subscribed on this connection, not confirmed yet
        self._waiters: dict[tuple[str, str], deque[asyncio.Future[bool]]] = {}
        self._conn: AbstractConnection | None = None
        self._send_lock = asyncio.Lock()
        self._inbox: deque[tuple[str, int, bytes]] = deque()
        self._inbox_bytes = 0  # the messages' sizes
        self._shedding = False  # the inbox reached its bound: live messages are left to the history
        self._overflow_logged = 0.0
        self._inbox_ready = asyncio.Event()
        self._holding = False  # waiting for subscriptions to be confirmed before delivering
        self._owed = False  # a catch-up from the position is owed before anything live
        self._from_start = False  # ... from the start of the history (Redis lost its data)
        self._generation = 0  # counts connections: a catch-up knows whether another gap began
        self._connected_before = False
        self._tasks: list[asyncio.Task[None]] = []
        self.tried = asyncio.Event()  # set once the first connection attempt has ended, either way
        self._errands: set[asyncio.Future[None]] = set()  # unsubscribes nobody waits for
        self.last_error: str | None = None
        verb = "S" if bus.sharded else ""
        self._subscribe, self._unsubscribe = f"{verb}SUBSCRIBE", f"{verb}UNSUBSCRIBE"

    @property
    def name(self) -> str:
        return "REDIS_URL" if self.node is None else f"{self.node[0]}:{self.node[1]}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"redis-subscriber-{self.name}"),
            asyncio.create_task(self._deliver_forever(), name=f"redis-deliverer-{self.name}"),
        ]

    async def close(self) -> None:
        for task in (*self._tasks, *self._errands):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._errands, return_exceptions=True)
        self._tasks = []
        await self._drop_connection()

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def ready(self) -> bool:
        return self._conn is not None and not self._initial and not self._holding and not self._owed

    # --- channels -------------------------------------------------------------------------

    async def hold(self, channel: str) -> bool:
        """Subscribe `channel`: True once Redis confirmed it; False while this node is
        unreachable (it is made on reconnect); BusUnavailable when Redis did not confirm in time."""
        self.wanted.add(channel)
        return await self._command(self._subscribe, channel)

    async def release(self, channel: str) -> None:
        self._drop_wanted(channel)
        try:
            await self._command(self._unsubscribe, channel)
        except BusUnavailable as exc:  # a reconnect subscribes only what is wanted
            log.warning("%s", exc)

    def forget(self, channel: str) -> None:
        """Stop wanting a channel that moved to another node (Redis dropped it here already,
        or this node is gone); a live connection is told, without waiting for its answer."""
        self._drop_wanted(channel)
        conn = self._conn
        if conn is not None and channel in self.confirmed:
            task = asyncio.ensure_future(self._send_quietly(conn, self._unsubscribe, self.bus.wire(channel)))
            self._errands.add(task)
            task.add_done_callback(self._errands.discard)

    def _drop_wanted(self, channel: str) -> None:
        self.wanted.discard(channel)
        self.displaced.discard(channel)
        self._initial.discard(channel)  # no confirmation to wait for any more
        self._release_when_confirmed()

    async def adopt(self, channels: Iterable[str]) -> None:
        """Take channels that moved here from another node. Their messages may have been
        missed meanwhile, so nothing more is delivered here until the history of their
        partitions has been read from the instance's position."""
        new = set(channels) - self.wanted
        if not new:
            return
        self.wanted |= new
        self._owed = True
        self._generation += 1  # a catch-up under way read without them: it must run again
        conn = self._conn
        if conn is None:
            return  # the connection subscribes every wanted channel when it is made
        self._initial |= new
        self._holding = True
        try:
            await self._subscribe_all(conn, new)
        except REDIS_FAILURES as exc:
            log.warning("subscribing moved channels on %s failed (%s); the reconnect will", self.name, exc)

    async def _send_quietly(self, conn: AbstractConnection, *args: str) -> None:
        try:
            await self._send(conn, *args)
        except REDIS_FAILURES as exc:  # the connection's reader finds out and reconnects
            log.info("%s on %s failed: %s", args[0], self.name, exc)

    async def _subscribe_all(self, conn: AbstractConnection, channels: Iterable[str]) -> None:
        """Subscribe many channels in few commands: one per partition, since one SSUBSCRIBE
        must name channels of a single slot."""
        by_partition: dict[int, list[str]] = {}
        for channel in sorted(channels):
            by_partition.setdefault(self.bus.partition_of(channel), []).append(self.bus.wire(channel))
        for wired in by_partition.values():
            await self._send(conn, self._subscribe, *wired)

    async def _command(self, verb: str, channel: str) -> bool:
        conn = self._conn
        if conn is None:
            return False
        kind = verb.lower()
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault((kind, channel), deque())
        queue.append(waiter)
        try:
            if not await self._send(conn, verb, self.bus.wire(channel)):
                return False
            return await asyncio.wait_for(asyncio.shield(waiter), self.bus.timeout)
        except REDIS_FAILURES as exc:
            raise BusUnavailable(f"Redis did not confirm {kind} {channel}: {exc or 'timed out'}") from None
        finally:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                self._waiters.pop((kind, channel), None)

    async def _send(self, conn: AbstractConnection, *args: str) -> bool:
        """Write a command on the connection; False if that connection is gone.

        Never on a connection that was dropped (redis-py would silently reconnect it, and
        nobody would read that orphan subscriber), and never triggering a read: the reader
        task owns all reads.
        """
        async with self._send_lock:
            if conn is not self._conn or not conn.is_connected:
                return False
            await conn.send_command(*args, check_health=False)
            return True

    # --- the connection ---------------------------------------------------------------------

    async def _run(self) -> None:
        bus = self.bus
        delay = bus.backoff_min
        while True:
            try:
                try:
                    await self._connect()
                finally:
                    self.tried.set()
                delay = bus.backoff_min
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except (*REDIS_FAILURES, BusUnavailable) as exc:
                self.last_error = bus.last_error = f"{type(exc).__name__}: {exc}"
                log_failure(log, f"Redis subscriber on {self.name} lost", exc, delay)
            except Exception:  # keep the consumer alive whatever a bug throws
                self.last_error = bus.last_error = "internal error"
                log.exception("Redis consumer on %s failed; restarting it", self.name)
            await self._drop_connection()
            bus.lost(self)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, bus.backoff_max)
            bus.reconnects += 1

    async def _connect(self) -> None:
        bus = self.bus
        conn = await bus.connect_subscriber(self.node)
        try:
            # A reconnect owes a catch-up; a connection made for channels that moved here too.
            owed = self._owed or self._connected_before
            if self._connected_before:
                if await bus.lost_its_data():
                    self._from_start = True
                await bus.read_clock()  # live offsets are checked against Redis's clock
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        self._connected_before = True
        self.displaced.clear()  # subscribed again below: a MOVED answer says if they still are
        self._generation += 1
        self._initial = set(self.wanted)
        # Nothing live is delivered until the history after our position has been.
        self._holding = self._owed = owed
        await self._subscribe_all(conn, self._initial)
        self.last_error = bus.last_error = None
        log.info("Redis subscriber on %s connected; subscribing %d channels", self.name, len(self._initial))
        self._release_when_confirmed()

    async def _read_forever(self) -> None:
        assert self._conn is not None
        conn = self._conn
        pinged = False
        while True:
            try:
                reply = await conn.read_response(timeout=self.bus.idle_ping)
            except (MovedError, AskError) as exc:
                # A (S)SUBSCRIBE for a slot this node no longer owns: the map we used is stale.
                log.info("Redis on %s: %s; following the slot", self.name, exc)
                moved = {c for c in self.wanted if key_slot(self.bus.wire(c).encode()) == exc.slot_id}
                self.displaced |= moved
                self._initial -= moved  # never confirmed here: delivering the rest need not wait
                self._release_when_confirmed()
                self.bus.moved(self)
                continue
            if reply is None:
                # Silence can hide a dead peer: ping, and give up if the pong never comes.
                if pinged:
                    raise TimeoutError("Redis did not answer PING")
                await self._send(conn, "PING")
                pinged = True
                continue
            pinged = False
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            kind = reply[0]
            if kind in (b"message", b"smessage"):
                named = self.bus.unwire(_text(reply[1]))
                if named is not None:
                    self._take(named[0], named[1], reply[2])
            elif kind in (b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe"):
                named = self.bus.unwire(_text(reply[1]))
                if named is not None:
                    self._confirm(_text(kind), named[0])
                    self._release_when_confirmed()

    def _take(self, channel: str, partition: int, message: bytes) -> None:
        """Queue a live message, unless the inbox is full: then it is left to the history."""
        bus = self.bus
        if self._shedding:
            bus.shed += 1
            return
        self._inbox.append((channel, partition, message))
        self._inbox_bytes += len(message)
        self._inbox_ready.set()
        if len(self._inbox) >= bus.inbox_max_messages or self._inbox_bytes >= bus.inbox_max_bytes:
            self._shedding = True
            bus.overflows += 1
            now = asyncio.get_running_loop().time()
            if now - self._overflow_logged >= _OVERFLOW_LOG_EVERY:
                self._overflow_logged = now
                log.warning(
                    "Redis subscriber on %s: %d messages (%d bytes) wait for delivery; live messages are "
                    "read from the history instead until it catches up (%d overflows so far)",
                    self.name, len(self._inbox), self._inbox_bytes, bus.overflows,
                )

    def _confirm(self, kind: str, channel: str) -> None:
        if kind.endswith("unsubscribe"):
            self.confirmed.discard(channel)
        else:
            self.confirmed.add(channel)
            self._initial.discard(channel)
        queue = self._waiters.get((kind, channel))
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        if kind == "sunsubscribe" and channel in self.wanted:
            # Unasked: the channel's slot moved to another shard (a reshard or a failover).
            log.info("Redis moved channel %s away from %s; following it", channel, self.name)
            self.displaced.add(channel)
            self.bus.moved(self)

    def _release_when_confirmed(self) -> None:
        if self._holding and not self._initial:
            self._holding = False
            self._inbox_ready.set()  # the deliverer catches up, then goes live

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        # A catch-up under way reads `confirmed` to pick what it delivers: it must stop where it
        # is instead of taking every channel for one not held, and moving past their entries.
        self._generation += 1
        self.confirmed.clear()
        self._initial.clear()
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(False)
        if conn is not None:
            await conn.disconnect(nowait=True)

    # --- delivering -----------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        bus = self.bus
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            if self._holding:
                continue
            if self._owed and not await self._catch_up():
                continue
            inbox = self._inbox
            handled = 0
            while inbox and not self._holding and not self._owed:
                handled += 1
                if handled % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                    continue  # the flags may have changed meanwhile: look again before taking one
                channel, partition, message = inbox.popleft()
                self._inbox_bytes -= len(message)
                offset = bus.offset_in(message)
                mark = None
                if offset is not None:
                    mark = Mark(partition, offset)
                    if not bus.advance(mark):
                        bus.deduplicated += 1  # already delivered by a catch-up
                        continue
                if channel != bus.sync_channel:
                    await bus.deliver(channel, message, mark)
            if self._shedding and not inbox and not self._holding and not self._owed:
                await self._after_shedding()

    async def _after_shedding(self) -> None:
        """The inbox that overflowed is empty: queue live messages again, and read the ones left
        out from the history. In this order, with nothing in between: whatever was left out was
        published before the history is read, so the read covers it."""
        bus = self.bus
        self._shedding = False
        if bus.has_history:
            self._owed = True
            self._inbox_ready.set()
            return
        bus.gaps += 1
        log.error("Redis subscriber on %s: live messages were dropped with no history to read them from; "
                  "its sockets are told", self.name)
        await bus.on_gap("gap")

    async def _catch_up(self) -> bool:
        """Deliver what was published after the position on the partitions held here; False to retry."""
        bus = self.bus
        if not bus.has_history:
            self._owed = False
            return True
        # Only partitions whose channels this connection holds: those Redis moved away are caught
        # up by their new node's connection, from a position this one must not move.
        if self._conn is None:
            return False  # dropped: the reconnect owes the catch-up, and wakes the deliverer once confirmed
        partitions = {bus.partition_of(channel) for channel in self.confirmed}
        generation = self._generation
        if self._from_start:
            bus.rewind(partitions)
            self._from_start = False  # rewound once: a catch-up cut short goes on from where it got to
        since = bus.position_now()
        replayed = 0
        complete = True
        while True:
            start = bus.position_now()
            try:
                # Every channel of these partitions: one confirmed while this runs gets its entries too.
                page = await bus.read(start, partitions, None, limit=CATCH_UP_PAGE)
            except BusUnavailable as exc:
                bus.replayed += replayed
                log.warning("catching up on %s from %s failed (%s); retrying", self.name, start, exc)
                asyncio.get_running_loop().call_later(bus.backoff_min, self._inbox_ready.set)
                return False
            for handled, entry in enumerate(page.entries, 1):
                if handled % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if generation != self._generation:
                    # Another gap began (the connection dropped, or channels moved here): what is
                    # confirmed no longer says what is held. The position stays at the last entry
                    # handled, and the next catch-up goes on from there: nothing skipped unseen.
                    break
                if entry.mark.partition not in partitions or not bus.advance(entry.mark):
                    continue  # delivered meanwhile (live on another node's connection, before a move)
                if entry.channel in self.confirmed and entry.channel != bus.sync_channel:
                    replayed += 1
                    await bus.deliver(entry.channel, entry.message, entry.mark)
            if generation != self._generation:
                bus.replayed += replayed
                log.info("Redis subscriber on %s: a gap began during the catch-up from %s (%d replayed); "
                         "it goes on from %s", self.name, since, replayed, bus.position_now())
                self._inbox_ready.set()  # the deliverer looks again: still owed, or holding until confirmed
                return False
            for partition in partitions:
                bus.advance(Mark(partition, page.end.at(partition)))
            complete = complete and page.complete
            if not page.more:
                break
            await asyncio.sleep(0)  # the reader's turn between pages: confirmations, the inbox's bound
        bus.replayed += replayed
        self._owed = False
        log.info("Redis subscriber on %s caught up from %s: %d replayed", self.name, since, replayed)
        if not complete:
            bus.gaps += 1
            log.error(
                "events after %s were trimmed from the history before this instance could read "
                "them (outage longer than the retention); its sockets are told", since,
            )
            await bus.on_gap("gap")
        self._inbox_ready.set()
        return True


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")

"""An Engine.IO socket whose WebSocket path costs less per packet.

python-engineio's socket pays, for every packet it writes, a new task and a timer
(`asyncio.wait_for` around `queue.get()`); for every frame it reads, two tasks; and for every
socket, a task that sleeps between pings. Profiles of broadcasts to a few hundred sockets put
about a fifth of the server's CPU in that machinery. `LeanSocket` keeps the library's protocol
and state, and replaces only those loops:

- the writer awaits the queue directly; a `None` in the queue (put by `close()` and by the
  reader when the peer leaves) ends it, so it never needs a timeout to notice a dead socket;
  under hypercorn it writes ready-made frames, everything queued in one write (`frames`);
- the reader awaits each frame directly, not wrapped in two tasks, and with no timer: a peer
  that goes silent leaves a ping unanswered, and `LeanEngine.sweep` closes its socket (a peer
  that does not answer the close within a ping timeout either is cut off: one timer per close);
- pings are timer callbacks, not sleeping tasks, and the pings due within the same second
  share one timer (`Pinger`); the check for unanswered pings looks at every socket in one pass
  every few seconds (`LeanEngine.sweep`), not in the library's monitor task that wakes once
  per socket. An idle socket then costs the event loop no wake-ups of its own, and about a
  third of the server CPU it cost before (bench W4);
- each socket's packet queue is a `LeanQueue`: an idle `asyncio.Queue` holds three deques and
  an Event (about 3 KB with their blocks); an idle `LeanQueue` holds two short lists.

Upgrades from long-polling keep the library's handler: that path is rare and its handshake is
the library's business.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import engineio
from engineio import exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from . import frames

log = logging.getLogger(__name__)

# The most one write carries when a socket's queue holds many frames: large enough for a burst,
# small enough that a slow peer's kernel buffer and hypercorn's flow control still pace it.
WRITE_BATCH_BYTES = 256 * 1024
# Sockets `LeanEngine.sweep` looks at between two yields to the event loop.
SWEEP_CHUNK = 2000


class LeanQueue:
    """The part of `asyncio.Queue` that Engine.IO uses (unbounded, FIFO), in a few hundred bytes.

    Queues rarely hold more than a handful of packets (a slow reader is evicted at
    SOCKET_MAX_QUEUE), so a list is as fast as a deque here and far smaller when empty.
    """

    __slots__ = ("_discarding", "_getters", "_items", "_joiners", "_unfinished")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future[None]] = []
        self._unfinished = 0
        self._joiners: list[asyncio.Future[None]] | None = None
        self._discarding = False

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        if self._discarding:
            return
        self._items.append(item)
        self._unfinished += 1
        self._wake_next()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter in self._getters:
                    self._getters.remove(getter)
                elif self._items and not getter.cancelled():
                    self._wake_next()  # this getter was woken but leaves: pass the turn on
                raise
        return self._items.pop(0)

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0:
            self._release_joiners()

    def discard(self) -> None:
        """The consumer is gone: drop what is queued and whatever comes later, all counted done."""
        self._discarding = True
        self._items.clear()
        self._unfinished = 0
        self._release_joiners()

    def _release_joiners(self) -> None:
        for joiner in self._joiners or ():
            if not joiner.done():
                joiner.set_result(None)
        self._joiners = None

    def reserve(self) -> None:
        """Count an item that is not queued yet as unfinished: a `join()` waits for it too."""
        self._unfinished += 1

    def unreserve(self) -> None:
        """End a reservation (gone already if the queue was discarded meanwhile)."""
        if self._unfinished > 0:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._release_joiners()

    def put_front_nowait(self, item: Any) -> None:
        """Queue `item` ahead of everything queued: what was due before them, handed on late."""
        if self._discarding:
            return
        self._items.insert(0, item)
        self._unfinished += 1
        self._wake_next()

    async def join(self) -> None:
        if self._unfinished:
            joiner = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner


class LeanEngine(engineio.AsyncServer):
    """Engine.IO server whose sockets queue their packets in a `LeanQueue`, and whose session
    ids start with this instance's tag (`<tag>.<random>`): python-socketio takes its sids from
    here too, so any instance can tell which one holds a socket from its sid alone."""

    sid_tag = ""
    _flusher: Flusher | None = None
    _pinger: Pinger | None = None
    _watcher: asyncio.Task[None] | None = None
    _stopped = False  # shut down: no sweep starts again
    cut_off = 0  # WebSocket connections aborted: their peer did not answer the server's close

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The library's client monitor wakes once per socket per ping timeout (50 times a second
        # for 1,000 sockets), each time through asyncio.wait_for; `watch` replaces it.
        kwargs["monitor_clients"] = False
        super().__init__(*args, **kwargs)

    @property
    def flusher(self) -> Flusher:
        if self._flusher is None:
            self._flusher = Flusher()
        return self._flusher

    @property
    def pinger(self) -> Pinger:
        if self._pinger is None:
            self._pinger = Pinger(self.ping_interval)
        return self._pinger

    def create_queue(self, *args: Any, **kwargs: Any) -> LeanQueue:
        return LeanQueue()

    def generate_id(self) -> str:
        random_part: str = super().generate_id()
        return f"{self.sid_tag}.{random_part}" if self.sid_tag else random_part

    def watch(self) -> None:
        """Start the sweep of this engine's sockets in the running loop (once; a no-op after)."""
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        if self._watcher is None or self._watcher.done() or self._watcher.get_loop() is not loop:
            # A context of its own: not that of the connection that happened to start it.
            self._watcher = loop.create_task(
                self._sweep_forever(), name="engineio-watch", context=contextvars.Context()
            )

    async def shutdown(self) -> None:
        self._stopped = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
        await super().shutdown()

    async def _sweep_forever(self) -> None:
        # A quarter of the ping timeout: a socket whose pong is late is closed at most that much
        # after its deadline (the library's monitor: up to a whole ping timeout after).
        period = self.ping_timeout / 4
        while True:
            await asyncio.sleep(period)
            await self.sweep()

    async def sweep(self) -> None:
        """Forget closed sockets, and close those whose last ping went unanswered past the
        ping timeout, as the library's monitor does. (For a WebSocket this is also what ends
        its reader's wait on a silent peer: the reader has no timer of its own.)"""
        deadline = time.time() - self.ping_timeout
        for n, (sid, sock) in enumerate(list(self.sockets.items()), 1):
            if sock.closed:
                if self.sockets.get(sid) is sock:
                    del self.sockets[sid]
            elif not sock.closing and sock.last_ping and sock.last_ping < deadline:
                try:
                    await sock.check_ping_timeout()  # closes it, telling socketio why
                except Exception:  # one socket's failure must not spare the rest of the pass
                    log.exception("closing socket %s after its ping timeout failed", sid)
            if n % SWEEP_CHUNK == 0:
                await asyncio.sleep(0)  # tens of thousands of sockets: others run in between


class Flusher:
    """Sockets with frames to write once this turn of the event loop ends: a burst of
    deliveries (a read from Redis often holds several messages) leaves each socket in one
    write, and the writer tasks stay asleep."""

    def __init__(self) -> None:
        self._sockets: list[LeanSocket] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # where the flush is scheduled

    def add(self, sock: LeanSocket) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A loop that ended before its flush ran: its sockets ended with it.
            self._sockets = []
            self._loop = loop
        if not self._sockets:
            # FIFO: this runs before anything scheduled after it, such as the wake-up of a
            # writer for a packet queued later, so frames due earlier leave earlier.
            loop.call_soon(self._flush)
        self._sockets.append(sock)

    def _flush(self) -> None:
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.flush()
            except Exception:  # one socket's failure must not strand the others' frames
                log.exception("flushing frames to a socket failed")


class Pinger:
    """Ping timers, one per tick of at most a second: the pings due in it go out in one wake-up
    of the event loop, and their pongs mostly come back together. A ping leaves at most a tick
    after the library would send it, far inside the ping timeout the client allows."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._tick = min(1.0, interval / 10)
        self._due: dict[int, list[LeanSocket]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, sock: LeanSocket) -> None:
        """Ping `sock` once the ping interval has passed (rounded up to the next tick)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._due = {}  # timers of a loop that ended never fire
            self._loop = loop
        tick = math.ceil((loop.time() + self._interval) / self._tick)
        group = self._due.get(tick)
        if group is None:
            self._due[tick] = group = []
            loop.call_at(tick * self._tick, self._fire, tick)
        group.append(sock)

    def _fire(self, tick: int) -> None:
        for sock in self._due.pop(tick, ()):
            try:
                sock.ping()
            except Exception:  # one socket's failure must not cost the others their pings
                log.exception("pinging a socket failed")


class _Ready:
    """Frames already built, in a socket's queue as one item (see `LeanSocket.flush`)."""

    __slots__ = ("count", "ws_frame")

    def __init__(self, built: list[bytes]) -> None:
        self.ws_frame = built[0] if len(built) == 1 else b"".join(built)
        self.count = len(built)


class LeanSocket(AsyncSocket):
    """python-engineio's socket with cheaper WebSocket read, write and ping loops."""

    # The library's own state, declared for the type checker.
    last_ping: float | None
    connected: bool
    upgraded: bool

    _writer: asyncio.Task[None] | None = None  # set while the lean WebSocket path runs
    _reader: asyncio.Task[Any] | None = None  # the task reading that WebSocket, while it reads
    _stream: frames.FrameStream | None = None  # hypercorn's stream under it, when it is ours
    _parked = False  # the reader waits for a frame (the only place `_cut` may cancel it)
    _cut_off = False  # the peer never answered the close: its reader is told to stop
    _cut_timer: asyncio.TimerHandle | None = None  # set while a closed socket's reader may be cut
    # While the writer waits for nothing but the queue: its stream, which may take frames at once.
    _idle_stream: frames.FrameStream | None = None
    _pending: list[bytes] | None = None  # frames for that stream at the end of this loop turn
    _pending_size = 0

    @classmethod
    def adopt(cls, sock: AsyncSocket) -> None:
        """Turn a socket a `LeanEngine` just created into a lean one (same state, new loops)."""
        if type(sock) is AsyncSocket and isinstance(sock.queue, LeanQueue):
            sock.__class__ = cls
            # Every attribute the socket will ever have, now, before the library adds its own
            # later ones: its __dict__ grows once here instead of again mid-life.
            sock._writer = sock._reader = sock._stream = sock._idle_stream = sock._pending = None
            sock._cut_timer = None
            sock._pending_size = 0
            sock._parked = sock._cut_off = False

    async def send(self, pkt: eio_packet.Packet) -> None:
        if await self.check_ping_timeout():
            self.push((pkt,))

    def push(self, pkts: Sequence[eio_packet.Packet]) -> None:
        """Send packets, in order after everything sent before. While the writer is idle their
        frames are written once this loop turn ends (`flush`), with whatever else this socket
        is sent meanwhile, without waking the writer task: most of what a delivery cost per
        socket once its frame was built. Else they are queued for the writer."""
        if self._idle_stream is None or self.queue.qsize():
            for pkt in pkts:
                self.queue.put_nowait(pkt)
            return
        built = [frames.frame_of(pkt) for pkt in pkts]
        size = sum(map(len, built))
        if self._pending is None:
            self.server.flusher.add(self)
            self.queue.reserve()  # a close(wait=True) meanwhile waits for these frames too
            self._pending, self._pending_size = built, size
            return
        self._pending += built
        self._pending_size += size
        if self._pending_size >= WRITE_BATCH_BYTES:
            # A long burst (a catch-up, a busy inbox) goes to the writer now, where the queue
            # counts it towards the slow-consumer bound; what follows is queued behind it.
            self._hand_over()

    def _hand_over(self) -> None:
        built, self._pending = self._pending, None
        if built is None:
            return
        if built:
            self.queue.put_front_nowait(_Ready(built))  # ahead of anything queued meanwhile
        self.queue.unreserve()  # the queue counts the item itself now

    def flush(self) -> None:
        """Write the frames `push` kept, straight to the connection if it takes them without
        waiting; else hand them to the writer, ahead of what was queued after them."""
        built = self._pending
        stream = self._idle_stream
        if not built or stream is None or self.queue.qsize():
            self._hand_over()
            return
        if stream.write_now(built[0] if len(built) == 1 else b"".join(built)):
            self._pending = None
            self.queue.unreserve()
            frames.WRITTEN.frames += len(built)
            frames.WRITTEN.writes += 1
            frames.WRITTEN.at_once += 1
            return
        self._hand_over()

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        closing = not (self.closed or self.closing)
        writer = self._writer
        # Waiting for the queue to drain only makes sense while a writer drains it: ours, or the
        # library's after an upgrade. A long-polling queue drains only if the client sends
        # another GET, which nothing guarantees: waiting for it would hang the request (a POST
        # of a malformed packet) that asked for the close.
        drained = (not writer.done()) if writer is not None else self.upgraded
        await super().close(wait=wait and drained, abort=abort, reason=reason)
        if closing:
            if abort and writer is None and not self.upgraded:
                # A pending long-poll GET must get a valid payload, not an empty body (which
                # clients read as a parse error): a NOOP, after which the session is gone and
                # the client reconnects. Non-abortive closes have queued a CLOSE already.
                self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
            # Wakes whoever waits for packets: our writer, which ends and closes the WebSocket
            # once it has written what was queued before, or a pending long-poll GET, which the
            # library would otherwise hold for up to 45 s.
            self.queue.put_nowait(None)
            if self._reader is not None:
                # The peer has a ping timeout to answer the close; one that never does (it
                # still acknowledges TCP, or stopped reading, so the kernel keeps the
                # connection) is cut off then. The reader ending first cancels this.
                self._cut_timer = asyncio.get_running_loop().call_later(self.server.ping_timeout, self._cut)

    def _cut(self) -> None:
        self._cut_timer = None
        reader = self._reader
        if reader is None:
            return  # it ended meanwhile
        self._cut_off = True
        self.server.cut_off += 1
        # Abort the connection: the reader sees the peer gone, and a writer stuck on a peer
        # that stopped reading is freed too. Without hypercorn's asyncio HTTP/1.1 connection
        # under it (HTTP/2), stop the reader, only where it waits for a frame.
        if self._stream is not None and self._stream.abort():
            return
        if self._parked:
            reader.cancel()

    def schedule_ping(self) -> None:
        if self.last_ping:  # the previous ping was answered (or this is the first)
            self.last_ping = None
            self.server.pinger.add(self)

    def ping(self) -> None:
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.push((eio_packet.Packet(eio_packet.PING),))

    async def _websocket_handler(self, ws: Any) -> None:
        if self.connected:
            await super()._websocket_handler(ws)  # an upgrade from long-polling
            return
        self.connected = self.upgraded = True
        self._reader = asyncio.current_task()
        self._stream = frames.stream_of(ws)
        self._writer = writer = asyncio.create_task(self._write_until_closed(ws))
        try:
            await self._read_until_closed(ws)
        finally:
            # A close from here on sets no cut-off timer (nothing to cut), and the socket, which
            # its next ping's timer may keep a while, no longer keeps the connection's objects.
            self._reader = self._stream = None
            if self._cut_timer is not None:  # and none set before keeps the socket alive
                self._cut_timer.cancel()
                self._cut_timer = None
            self.queue.put_nowait(None)
            await writer
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)

    async def _read_until_closed(self, ws: Any) -> None:
        max_size = self.server.max_http_buffer_size
        while not self._cut_off:
            # No timer per wait: a peer that goes silent leaves its ping unanswered, and the
            # engine's sweep closes the socket, which ends this wait (or `_cut` does, if the
            # peer does not answer the close either).
            self._parked = True
            try:
                data = await ws.wait()
            except OSError:
                return  # the peer left, or the socket was closed
            except asyncio.CancelledError:
                if not self._cut_off:
                    raise
                # Stopped by `_cut` (HTTP/2: no connection of its own to abort): end as if the
                # peer had left, so the app returns and hypercorn ends the stream.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return
            finally:
                self._parked = False
            if len(data) > max_size:
                return  # the library's rule: an oversized frame ends the connection
            try:
                await self.receive(eio_packet.Packet(encoded_packet=data))
            except exceptions.UnknownPacketError:
                continue  # as the library: a packet type the server does not take is ignored
            except Exception:  # noqa: BLE001 - an undecodable frame, or a closed socket: hang up
                return

    async def _write_until_closed(self, ws: Any) -> None:
        queue = self.queue
        stream = frames.stream_of(ws)
        direct = stream if stream is not None and stream.writes_now() else None
        try:
            while True:
                if queue.qsize():
                    pkt = queue.get_nowait()
                else:
                    # Idle: `push` may write at once meanwhile, not once anything is queued.
                    self._idle_stream = direct
                    try:
                        pkt = await queue.get()
                    finally:
                        self._idle_stream = None
                queue.task_done()
                if pkt is None:
                    break
                if stream is None:
                    await ws.send(pkt.encode())
                    continue
                # Whatever was queued meanwhile leaves in the same write: one system call and one
                # pass through hypercorn for a burst, not one per message.
                batch = [frames.frame_of(pkt)]
                size = len(batch[0])
                count = getattr(pkt, "count", 1)  # a _Ready holds several
                ended = False
                while queue.qsize() and size < WRITE_BATCH_BYTES:
                    pkt = queue.get_nowait()
                    queue.task_done()
                    if pkt is None:
                        ended = True
                        break
                    batch.append(frames.frame_of(pkt))
                    size += len(batch[-1])
                    count += getattr(pkt, "count", 1)
                frames.WRITTEN.frames += count
                frames.WRITTEN.writes += 1
                await stream.send_frames(batch[0] if len(batch) == 1 else b"".join(batch))
                if ended:
                    break
        except Exception:  # noqa: BLE001 - the peer is gone; the reader sees it too and ends the socket
            return
        finally:
            queue.discard()  # nobody writes from now on: a close(wait=True) must not wait for it
            await ws.close()

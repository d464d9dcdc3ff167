"""Writing to local sockets: encode a Socket.IO event once, queue its frames for each socket,
evict a socket that stopped reading. The only code outside the engine that touches Engine.IO
sockets (python-engineio's `sockets`, and a socket's `queue`, `closing` and `closed`:
instance state, which the suites that deliver exercise on every run)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from .transport import LeanSocket

log = logging.getLogger(__name__)

NAMESPACE = "/"
Frames = list[eio_packet.Packet]


class Writer:
    """Queues frames for the sockets of this instance, never waiting on a slow reader."""

    def __init__(self, sio: socketio.AsyncServer, max_queue: int) -> None:
        self._sio = sio
        self.max_queue = max_queue
        self.delivered = 0
        self.slow_evicted = 0
        self._evictions: set[asyncio.Task[None]] = set()

    def encode(self, event: str, data: Any, stamp: str | None) -> Frames:
        """One event's frames, with a recovering socket's position as a last argument if given."""
        args = [event, data] if stamp is None else [event, data, stamp]
        encoded = self._sio.packet_class(sio_packet.EVENT, namespace=NAMESPACE, data=args).encode()
        parts = encoded if isinstance(encoded, list) else [encoded]
        # Shared by every recipient: an Engine.IO packet caches its encoding, so each frame is
        # built once per broadcast, not once per socket.
        return [eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts]

    def _socket(self, sid: str) -> Any:
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        return self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None

    def write(self, sid: str, frames: Frames) -> None:
        """Queue frames for a socket, or evict it if its queue is full."""
        sock = self._socket(sid)
        if sock is None or sock.closing or sock.closed:
            return
        if sock.queue.qsize() >= self.max_queue:
            self._evict(sock, sid)
            return
        # Written at once or queued, never awaited: never blocks on a slow reader, and skips the
        # library's per-packet ping check (its service task checks pings anyway).
        if isinstance(sock, LeanSocket):
            sock.push(frames)
        else:
            for frame in frames:
                sock.queue.put_nowait(frame)
        self.delivered += 1

    def queued(self, sid: str) -> int:
        """How many packets wait in a socket's queue (0 for one that is gone)."""
        sock = self._socket(sid)
        return 0 if sock is None else int(sock.queue.qsize())

    def gone(self, sid: str) -> bool:
        """Whether a socket's connection has ended (or never was)."""
        sock = self._socket(sid)
        return sock is None or bool(sock.closed)

    def close(self, sid: str, reason: str) -> Awaitable[None] | None:
        """End a socket's transport after what is queued (no Engine.IO close packet, which
        python-socketio's client would take as final); None when it is gone already."""
        sock = self._socket(sid)
        return None if sock is None else sock.close(wait=True, abort=True, reason=reason)

    async def drain(self, sid: str, timeout: float) -> bool:
        """Wait until what is queued for a socket has been handed to its connection; False when
        it is gone or did not drain in time."""
        sock = self._socket(sid)
        if sock is None or sock.closing or sock.closed:
            return False
        try:
            await asyncio.wait_for(sock.queue.join(), timeout)
        except TimeoutError:
            return False
        return not (sock.closing or sock.closed)

    def evict(self, sid: str) -> None:
        """Disconnect a socket as a slow consumer."""
        sock = self._socket(sid)
        if sock is not None and not (sock.closing or sock.closed):
            self._evict(sock, sid)

    def _evict(self, sock: Any, sid: str) -> None:
        """Disconnect a socket that stopped reading; its queue stays at the bound it reached."""
        self.slow_evicted += 1
        log.warning("socket %s stopped reading (%d packets queued); disconnecting it", sid, sock.queue.qsize())
        task = asyncio.create_task(sock.close(wait=False, abort=True, reason="slow consumer"))
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

    async def stop(self) -> None:
        for task in list(self._evictions):
            task.cancel()
        await asyncio.gather(*self._evictions, return_exceptions=True)

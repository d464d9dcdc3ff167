"""A TCP forwarder the tests can cut and restore: a network fault between real parts, on demand.

It runs its own event loop on its own thread, so it keeps forwarding (and cutting) while a test blocks
its loop with `time.sleep` or a synchronous call; every public method is safe from any other thread and
returns only once the proxy's loop has done the work.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")
Backend = tuple[str, int]
_CONNECT_TIMEOUT = 5.0  # a backend that neither accepts nor refuses counts as refusing after this
_CALL_TIMEOUT = 10.0  # bound on every hop to the proxy's thread


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    """SO_LINGER 0: closing sends an RST, so the peer sees a reset at once, not a polite end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # already gone
            pass


class _Side(asyncio.Protocol):
    """One socket of a forwarded pair: what it reads is written to the other one."""

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.early: list[bytes] = []  # what a client sent before its backend was there (should reading go on)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def itself(self) -> _Side:
        """A protocol factory that hands out this very side (the pair must know it before it connects)."""
        return self

    @property
    def peer(self) -> _Side | None:
        return self.pair.backend if self is self.pair.client else self.pair.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.pair.proxy._live.add(self)
        if self is self.pair.client:
            self.pair.proxy._route(self.pair)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        elif not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.pair.half_closed(self)
        return True  # keep our sending direction open until the peer ends too

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.proxy._live.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        if self is self.pair.client or self is self.pair.backend:  # not a backend attempt given up on
            self.pair.side_lost(self, exc)

    # flow control: a peer that cannot keep up slows down the side that feeds it
    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()


class _Pair:
    """An accepted client and the backend connection made for it (once there is one)."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.backend: _Side | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.closing = False
        self.counted = False  # in TcpProxy.connections

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.backend) if s is not None]

    def half_closed(self, side: _Side) -> None:
        peer = side.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if all(s.eof for s in self.sides()) and self.backend is not None:
            self.close(reset=False)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        # a reset is passed on as a reset, an orderly close as an orderly close (buffered bytes flushed)
        self.close(reset=exc is not None)

    def close(self, reset: bool) -> None:
        if not self.closing:
            self.closing = True
            self.proxy._forget(self)
        if self.connecting is not None:
            self.connecting.cancel()
        for side in self.sides():
            if side.transport is not None and not side.lost.done():
                if reset:
                    _reset_on_close(side.transport)
                    side.transport.abort()
                elif not side.transport.is_closing():
                    side.transport.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to backends, round-robin, until told to `cut()` the network.

    `cut()` resets every forwarded connection in both directions and turns new connections away (accepted,
    then reset); `restore()` forwards again. Put it between clients and instances (`url_for()`), or between
    instances and Redis (`redis_url`).
    """

    def __init__(self, backends: Sequence[Backend], port: int = 0) -> None:
        self._backends: list[Backend] = list(backends)
        self._requested_port = port
        self.port = 0
        self._rotation = itertools.count()
        self._cut = False
        self._pairs: set[_Pair] = set()  # loop thread only, as is _live
        self._live: set[_Side] = set()  # every socket not closed yet, closing ones included
        self._open = 0  # forwarded pairs with both sides connected; an int, so readable from any thread
        self._accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._closed = False

    # -- from any thread ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind 127.0.0.1 (a free port unless one was given) and serve on a new thread."""
        if self._closed:
            raise RuntimeError("this TcpProxy is closed; make a new one")
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen)
        except BaseException:
            self._stop_loop()
            raise
        return self

    def url_for(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        """Forwarded pairs open right now (client and backend both connected, not closing)."""
        return self._open

    @property
    def accepted(self) -> int:
        """Client connections accepted since start, cut or not: a reconnection attempt shows up here."""
        return self._accepted

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Reset every open connection, both ways, and reset new ones until `restore()`; returns when done."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Forward new connections again (those cut stay cut: their clients must reconnect)."""
        self._call(self._do_restore)

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Backends for new connections, round-robin from the first; open connections keep theirs."""
        chosen = list(backends)
        self._call(lambda: self._do_set_backends(chosen))

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "cut" if self._cut else "forwarding"
        return f"<TcpProxy 127.0.0.1:{self.port} -> {self._backends} {state}, {self._open} open>"

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `fn()` on the proxy's loop and wait for it: callers see the work done when we return."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("this TcpProxy is closed" if self._closed else "TcpProxy.start() first")
        if threading.current_thread() is self._thread:
            raise RuntimeError("TcpProxy methods are for other threads; its loop would wait on itself")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_CALL_TIMEOUT)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CALL_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    # -- on the proxy's loop ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._accept, "127.0.0.1", self._requested_port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> _Side:
        self._accepted += 1
        pair = _Pair(self)
        self._pairs.add(pair)
        return pair.client  # whose connection_made calls _route

    def _route(self, pair: _Pair) -> None:
        """Send a newly accepted client to a backend (or turn it away while cut)."""
        transport = pair.client.transport
        if pair.closing or transport is None:
            return
        if self._cut or not self._backends:
            pair.close(reset=True)
            return
        transport.pause_reading()  # the kernel keeps what the client sends until a backend takes it
        start = next(self._rotation) % len(self._backends)
        order = self._backends[start:] + self._backends[:start]
        pair.connecting = asyncio.get_running_loop().create_task(self._connect(pair, order))

    async def _connect(self, pair: _Pair, order: list[Backend]) -> None:
        loop = asyncio.get_running_loop()
        for host, port in order:
            backend = _Side(pair)
            try:
                await asyncio.wait_for(loop.create_connection(backend.itself, host, port), _CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                continue  # refused (or silent): try the next one
            pair.connecting = None
            pair.backend = backend
            client = pair.client.transport
            if pair.closing or client is None or client.is_closing():
                pair.close(reset=True)  # the client left, or a cut came, while we were connecting
                return
            self._open += 1
            pair.counted = True
            if backend.transport is not None:
                for data in pair.client.early:
                    backend.transport.write(data)
                pair.client.early.clear()
                if pair.client.eof:
                    backend.transport.write_eof()
            client.resume_reading()
            return
        pair.connecting = None
        pair.close(reset=True)  # nobody accepts: the client gets a reset, as from a dead server

    def _forget(self, pair: _Pair) -> None:
        """Called once per pair, when it starts closing."""
        self._pairs.discard(pair)
        if pair.counted:
            self._open -= 1

    async def _close_all(self) -> None:
        for pair in list(self._pairs):
            pair.close(reset=True)  # also stops connection attempts under way
        lost = []
        for side in list(self._live):  # pairs closing politely too: a cut leaves nothing half open
            lost.append(side.lost)
            if side.transport is not None:
                _reset_on_close(side.transport)
                side.transport.abort()
        # abort() closes each socket in a callback of the next loop turn: wait for them, so that
        # "cut() returned" means "every socket is closed"
        if lost:
            await asyncio.wait(lost, timeout=_CALL_TIMEOUT)

    async def _do_cut(self) -> None:
        self._cut = True
        await self._close_all()

    async def _do_restore(self) -> None:
        self._cut = False

    async def _do_set_backends(self, backends: list[Backend]) -> None:
        self._backends = backends
        self._rotation = itertools.count()

    async def _shutdown(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()
        await self._close_all()
        if self._server is not None:
            await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

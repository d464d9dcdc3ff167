"""How the app is served: hypercorn settings the Procfile loads
(`--config python:webapp.serving.hypercorn`), and the write timeout on the listening sockets.

Hypercorn's graceful timeout is derived from SHUTDOWN_TIMEOUT, so the SIGTERM drain always
finishes before hypercorn cancels what is left.

Hypercorn (0.18) keeps a connection its client closed open until its keep-alive timer runs out
(--keep-alive: 30 s with the Procfile), in CLOSE-WAIT; `release_on_eof` ends that wait at the
client's end of stream (docs/hypercorn-close-wait.md is the upstream report).

Hypercorn buffers a WebSocket message up to its own limit (16 MiB by default) before the app
sees it; the app's frame cap (twice MAX_PAYLOAD_BYTES: Engine.IO's max_http_buffer_size) is far
lower, so a client could make each connection buffer 16 MiB. The same cap here refuses an
oversized frame before it is buffered. Command-line flags still override these.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from hypercorn.asyncio.tcp_server import TCPServer

from .config import ConfigError, Settings

log = logging.getLogger(__name__)
N = TypeVar("N", int, float)


# Hypercorn's grace beyond the drain's own deadline.
GRACE_MARGIN = 5.0


def frame_cap(environ: Mapping[str, str] | None = None) -> int:
    """The largest WebSocket frame the app takes: twice MAX_PAYLOAD_BYTES."""
    payload = _setting(environ, "MAX_PAYLOAD_BYTES", int, Settings.max_payload_bytes)
    return Settings(max_payload_bytes=payload).frame_cap


def graceful_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Hypercorn's grace after its shutdown starts: the SIGTERM drain's SHUTDOWN_TIMEOUT and a
    margin, so hypercorn never cuts connections the drain is still closing politely."""
    return _setting(environ, "SHUTDOWN_TIMEOUT", float, Settings.shutdown_timeout) + GRACE_MARGIN


def _setting(environ: Mapping[str, str] | None, name: str, cast: Callable[[str], N], default: N) -> N:
    """A number from the environment, or `default` when it is unset or unusable: hypercorn reads
    this module before the app starts, and the app itself reports a bad value, in one line."""
    raw = (os.environ if environ is None else environ).get(name, "")
    try:
        return cast(raw) if raw.strip() else default
    except ValueError:
        return default


def check_graceful_timeout(settings: Settings, argv: list[str]) -> None:
    """Refuse a --graceful-timeout on hypercorn's command line shorter than SHUTDOWN_TIMEOUT:
    hypercorn would cancel the connections the drain is still closing. (Without the flag, the
    config above derives it from SHUTDOWN_TIMEOUT.)"""
    given: str | None = None
    for index, word in enumerate(argv):
        if word == "--graceful-timeout" and index + 1 < len(argv):
            given = argv[index + 1]
        elif word.startswith("--graceful-timeout="):
            given = word.split("=", 1)[1]
    if given is None:
        return
    try:
        seconds = float(given)
    except ValueError:
        return  # hypercorn itself refuses it
    if seconds < settings.shutdown_timeout:
        raise ConfigError(
            f"SHUTDOWN_TIMEOUT ({settings.shutdown_timeout:g}s) exceeds hypercorn's --graceful-timeout ({seconds:g}s): "
            "the drain would be cut short; drop the flag (it is derived from SHUTDOWN_TIMEOUT) or raise it"
        )


def worker_count(environ: Mapping[str, str] | None = None) -> int:
    """Hypercorn's worker processes: none beside its own for WEB_CONCURRENCY=1 (it serves in its
    own process), else WEB_CONCURRENCY, each an instance of its own sharing the port."""
    wanted = _setting(environ, "WEB_CONCURRENCY", int, 1)
    return 0 if wanted <= 1 else min(wanted, 64)


class hypercorn:
    websocket_max_message_size = frame_cap()
    graceful_timeout = graceful_timeout()
    workers = worker_count()


def release_on_eof() -> None:
    """Make hypercorn let go of a connection as soon as its client ended it. Idempotent.

    Hypercorn's connection task (TCPServer.run) closes its socket only once every task of its
    task group has ended, the keep-alive timer included: after the client's FIN that timer runs
    out its whole --keep-alive, and the socket sits in CLOSE-WAIT meanwhile (a descriptor and
    a task per closed connection; thousands at a few hundred closing clients a second). Once
    the reader has seen the end of the stream no further request can come, so there is
    nothing to keep alive: stopping the timer there lets the task group end, and hypercorn
    closes the socket at once. A request still in flight is answered first (hypercorn already
    sent its app `http.disconnect`), then the connection closes as hypercorn closes any
    connection whose client is done. The hooks are listed in webapp/private_hooks.py.
    """
    if getattr(TCPServer._read_data, "releases_on_eof", False):
        return
    read_data = TCPServer._read_data

    async def read_then_release(self: TCPServer) -> None:
        await read_data(self)
        await self.idle_task.stop()

    read_then_release.releases_on_eof = True  # type: ignore[attr-defined]
    TCPServer._read_data = read_then_release  # type: ignore[method-assign]


def bound_writes(timeout: float) -> int:
    """Make every connection this process accepts give up a write that makes no progress for
    `timeout` seconds (SOCKET_WRITE_TIMEOUT); return how many listening sockets were set.

    A peer that stops reading fills its receive window, and hypercorn's writer then waits in
    `drain()` with no timeout: the connection, its file descriptor and its tasks stay, even
    after the socket was evicted or closed, since closing also has to write. Linux's
    TCP_USER_TIMEOUT (also counted while the window stays shut) makes the kernel drop such a
    connection; the blocked write then fails and hypercorn frees everything. Accepted
    connections inherit the option from the listening socket, which the server created
    before the app loaded, so the app sets it there: the sockets are this process's own
    bound, unconnected TCP sockets, found by descriptor.
    """
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_USER_TIMEOUT"):
        log.warning("SOCKET_WRITE_TIMEOUT needs Linux's TCP_USER_TIMEOUT; a peer that stops reading holds its connection")
        return 0
    tuned = 0
    try:
        serving = serving_sockets()
    except OSError:  # no /proc: the timeout cannot be set, and the server runs without it
        log.warning("SOCKET_WRITE_TIMEOUT: /proc/self/fd cannot be read; a peer that stops reading holds its connection")
        return 0
    for fd, _ in serving:
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
            tuned += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays the server's
    log.info("SOCKET_WRITE_TIMEOUT: writes give up after %.1fs on %d server sockets", timeout, tuned)
    return tuned


def serving_sockets(*, listening: bool = False) -> list[tuple[int, int]]:
    """The descriptors (and inodes) of the TCP sockets this process's server accepts on (with
    `listening`, only those listening already); raises OSError without /proc."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            fd = int(entry.name)
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError):
            continue  # not a socket (or already closed)
        try:
            wanted = sock.type == socket.SOCK_STREAM and _serving_socket(sock)
            if wanted and (not listening or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                found.append((fd, os.fstat(fd).st_ino))
        except OSError:
            pass
        finally:
            sock.detach()
    return found


async def listening_stopped(every: float = 0.25) -> None:
    """Return once the server, having listened, no longer listens on any of its sockets.

    In one of hypercorn's worker processes, that is how the worker learns that its parent began
    the shutdown: the parent got SIGTERM (from `docker stop`, say), the worker may not have.
    The app starts before the server listens, so the sockets are watched from the moment they
    listen.
    """
    watched: list[tuple[int, int]] = []
    while not watched:
        try:
            watched = serving_sockets(listening=True)
        except OSError:
            await asyncio.Event().wait()  # no /proc: nothing to watch
        await asyncio.sleep(every)
    while any(_listening(fd, inode) for fd, inode in watched):
        await asyncio.sleep(every)


def _listening(fd: int, inode: int) -> bool:
    """Whether descriptor `fd` is still the socket `inode` and still listening."""
    try:
        if os.fstat(fd).st_ino != inode:
            return False
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False
    finally:
        sock.detach()


def _serving_socket(sock: socket.socket) -> bool:
    """A TCP socket the server accepts on: listening already, or bound and not connected
    (hypercorn binds before the app starts and listens after)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return True
    try:
        sock.getpeername()
    except OSError:
        return bool(sock.getsockname()[1] != 0)  # bound, with no peer: about to listen
    return False  # a connection (to Redis, say)

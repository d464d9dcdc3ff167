"""How the app is served: hypercorn settings the Procfile loads
(`--config python:webapp.serving.hypercorn`), and the write timeout on the listening sockets.

Hypercorn buffers a WebSocket message up to its own limit (16 MiB by default) before the app
sees it; the app's frame cap (twice MAX_PAYLOAD_BYTES: Engine.IO's max_http_buffer_size) is far
lower, so a client could make each connection buffer 16 MiB. The same cap here refuses an
oversized frame before it is buffered. Command-line flags still override these.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)


def frame_cap(environ: os._Environ[str] | dict[str, str] | None = None) -> int:
    """The largest WebSocket frame the app takes: twice MAX_PAYLOAD_BYTES (the default when the
    variable is unusable: the app itself reports that configuration error, in one line)."""
    raw = (os.environ if environ is None else environ).get("MAX_PAYLOAD_BYTES", "")
    try:
        payload = int(raw) if raw.strip() else Settings.max_payload_bytes
    except ValueError:
        payload = Settings.max_payload_bytes
    return Settings(max_payload_bytes=payload).frame_cap


class hypercorn:
    websocket_max_message_size = frame_cap()


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
    for entry in Path("/proc/self/fd").iterdir():
        try:
            fd = int(entry.name)
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError):
            continue  # not a socket (or already closed)
        try:
            if sock.type == socket.SOCK_STREAM and _serving_socket(sock):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
                tuned += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays the server's
    log.info("SOCKET_WRITE_TIMEOUT: writes give up after %.1fs on %d server sockets", timeout, tuned)
    return tuned


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

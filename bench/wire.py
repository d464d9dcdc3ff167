"""A lean Socket.IO v5 client speaking the wire protocol over WebSocket on a raw asyncio protocol.

The load generator shares two cores with the servers, so it does as little as it can per
message: frames are parsed in `data_received` as they arrive (no task wakes up per message),
and only the Engine.IO open packet, the namespace connect, pings and `42["event", data]`
messages are understood, with no client-side event machinery.

A socket may opt in to connection state recovery (`recover=True`): its handshake auth carries
`"recover": true`, the server's CONNECT reply must carry a `pid`, and every event it gets has
one more, last argument, the event's offset (`42["event", data, "<ms>-<seq>"]`). The socket
strips it before its event handler sees the event, and checks as it goes that every event had
one and that each is after the previous one (see `OffsetChecks`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import orjson

from webapp.realtime.frames import masked

if TYPE_CHECKING:
    import aiohttp

# Called for every event with (socket index, event name, data, receive time from time.monotonic()).
EventHandler = Callable[[int, str, Any, float], None]
Payload = bytes | bytearray

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's constant for Sec-WebSocket-Accept
_MAX_HEAD = 65536  # longest upgrade answer we wait for, in bytes
CLOSE_WAIT = 1.0  # how long close() waits for the server's close frame, in seconds

# Opcodes and close codes of RFC 6455.
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_NORMAL, _PROTOCOL_ERROR, _UNSUPPORTED = 1000, 1002, 1003
_FIN_TEXT = 0x80 | _TEXT  # first byte of a whole text message in one frame: the common case


class ConnectRefused(RuntimeError):
    """The server refused the namespace connection (`44{...}`) or the handshake broke."""


def _endpoint(base_url: str) -> tuple[str, int, str, str]:
    """Host, port, Host header and request path of the Engine.IO WebSocket under `base_url`."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "ws") or not parts.hostname:
        raise ValueError(f"expected an http:// or ws:// URL, got {base_url!r}")
    path = parts.path + "/socket.io/?EIO=4&transport=websocket"
    return parts.hostname, parts.port or 80, parts.netloc, path


def _upgrade_request(host_header: str, path: str, key: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def _upgrade_problem(head: bytes, key: str) -> str | None:
    """What is wrong with the server's answer to the upgrade request, or None when it switched."""
    status, *lines = head.decode("latin-1").split("\r\n")
    words = status.split(" ", 2)
    if len(words) < 2 or words[1] != "101":
        return f"upgrade answered {status[:80]!r}"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        return "no Upgrade: websocket in the upgrade answer"
    if headers.get("sec-websocket-accept") != _accept(key):
        return "wrong Sec-WebSocket-Accept in the upgrade answer"
    return None


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame, masked with a fresh random key as RFC 6455 requires of clients."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    mask = os.urandom(4)
    return head + mask + masked(payload, mask)


def _connect_reply(connect: Payload) -> tuple[str | None, str | None]:
    """The sid and the pid of a `40{"sid": ..., "pid": ...}` namespace connect (None when absent)."""
    try:
        body = orjson.loads(connect[2:])
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    sid, pid = body.get("sid"), body.get("pid")
    return (sid if isinstance(sid, str) else None), (pid if isinstance(pid, str) and pid else None)


def parse_offset(value: Any) -> tuple[int, int] | None:
    """A Redis stream id `<ms>-<seq>` as an ordered pair, or None when `value` is not one."""
    if not isinstance(value, str):
        return None
    ms, dash, seq = value.partition("-")
    if not (dash and ms.isdecimal() and seq.isdecimal()):  # no sign, no spaces, int() accepts it
        return None
    return int(ms), int(seq)


# Events the server sends an opted-in socket about recovery itself; none belongs in a bench run.
RECOVERY_NOTICES = frozenset({"recovered", "recovery_failed"})


class OffsetChecks:
    """What one socket saw of the offsets, for the load generator's correctness verdict.

    An opted-in socket's every event must end with a well-formed offset after the previous one
    (the bench's events all come through the bus, which numbers them in order); a socket that did
    not opt in must never get one (no argument after the data).
    """

    __slots__ = ("missing", "not_increasing", "notices", "seen", "unexpected")

    def __init__(self) -> None:
        self.seen = 0  # opted-in events with a well-formed offset
        self.missing = 0  # opted-in events without one
        self.not_increasing = 0  # offsets not after the previous one of the same socket
        self.unexpected = 0  # events with an argument after the data on a socket that did not opt in
        self.notices = 0  # `recovered` / `recovery_failed` events

    @property
    def faults(self) -> int:
        return self.missing + self.not_increasing + self.unexpected + self.notices


def _drop(text: Payload) -> None:
    """`on_text` once we sent our close frame: what still comes in is no longer wanted."""


class _WebSocket(asyncio.Protocol):
    """The client side of RFC 6455 on one TCP connection: upgrade, frames in, masked frames out.

    Whole text messages go to `on_text` (which its owner may swap); `on_end` is called once,
    when the connection is gone, with the reason the upgrade failed (None otherwise).
    """

    def __init__(
        self,
        request: bytes,
        key: str,
        on_text: Callable[[Payload], None],
        on_end: Callable[[Exception | None], None],
    ) -> None:
        self.on_text = on_text
        self._on_end = on_end
        self._request = request
        self._key = key
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()  # the upgrade answer so far, then any partial frame
        self._upgraded = False
        self._close_sent = False
        self._shut = False  # the transport is closing: nothing more in or out
        self._refusal: Exception | None = None
        self._fragments: bytearray | None = None  # a fragmented message being assembled
        self._fragments_opcode = _TEXT
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut = True
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_end(self._refusal or exc)

    def data_received(self, data: bytes) -> None:
        if self._shut:
            return
        if not self._upgraded:
            data = self._upgrade(data)
            if not data:
                return
        buf = self._buf
        if buf:  # a partial frame waits: append, parse, keep what is still partial
            buf += data
            del buf[: self._frames(buf)]
        else:  # the usual case: whole frames, parsed straight from `data`
            used = self._frames(data)
            if used < len(data):
                buf += data[used:]

    def _upgrade(self, data: bytes) -> bytes:
        """Collect the upgrade answer; once it switched protocols, return the bytes after it."""
        buf = self._buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._refuse("no end to the upgrade answer")
            return b""
        head, rest = bytes(buf[:end]), bytes(buf[end + 4 :])
        buf.clear()
        problem = _upgrade_problem(head, self._key)
        if problem is not None:
            self._refuse(problem)
            return b""
        self._upgraded = True
        return rest

    def _frames(self, data: Payload) -> int:
        """Handle every whole frame in `data`; return how many bytes they took."""
        pos, end = 0, len(data)
        while end - pos >= 2 and not self._shut:
            first, second = data[pos], data[pos + 1]
            size = second & 0x7F
            start = pos + 2
            if size >= 126:  # 16- or 64-bit length follows
                width = 2 if size == 126 else 8
                if end - start < width:
                    break
                size = int.from_bytes(data[start : start + width], "big")
                start += width
            stop = start + size
            if stop > end:
                break
            pos = stop
            if first == _FIN_TEXT and not second & 0x80:
                self.on_text(data[start:stop])
            else:
                self._frame(first, second, data[start:stop])
        return pos

    def _frame(self, first: int, second: int, payload: Payload) -> None:
        """Anything but a whole unmasked text frame: control frames, fragments, errors."""
        fin, opcode = first & 0x80, first & 0x0F
        if second & 0x80 or first & 0x70:  # servers never mask; we negotiated no extensions
            self._fail(_PROTOCOL_ERROR)
        elif opcode == _PING:
            self._send(_PONG, bytes(payload))
        elif opcode == _PONG:
            pass
        elif opcode == _CLOSE:  # the server's, or its answer to ours: either way the end
            self._fail(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else _NORMAL)
        elif opcode == _CONTINUATION and self._fragments is not None:
            self._fragments += payload
            if fin:
                whole, self._fragments = bytes(self._fragments), None
                self._message(self._fragments_opcode, whole)
        elif opcode in (_TEXT, _BINARY) and self._fragments is None:
            if fin:
                self._message(opcode, payload)
            else:
                self._fragments, self._fragments_opcode = bytearray(payload), opcode
        else:
            self._fail(_PROTOCOL_ERROR)

    def _message(self, opcode: int, payload: Payload) -> None:
        if opcode == _TEXT:
            self.on_text(payload)
        else:  # Engine.IO binary attachments: the bench never sends any
            self._fail(_UNSUPPORTED)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self._transport is not None and not self._shut and not self._close_sent:
            self._transport.write(_client_frame(opcode, payload))

    def send_text(self, text: bytes) -> None:
        if self._shut or self._close_sent:
            raise ConnectionResetError("the WebSocket is closed")
        self._send(_TEXT, text)

    def close(self, code: int = _NORMAL) -> None:
        """Start the closing handshake: our close frame now, the TCP close when the server answers.

        Before the upgrade there is no one to tell: the connection just closes. Idempotent.
        """
        if not self._upgraded:
            self._close_transport()
        elif not self._close_sent:
            self._send(_CLOSE, code.to_bytes(2, "big"))
            self._close_sent = True
            self.on_text = _drop

    def _fail(self, code: int) -> None:
        """Our close frame (unless sent already) and the TCP close right away."""
        self.close(code)
        self._close_transport()

    def _refuse(self, reason: str) -> None:
        self._refusal = ConnectRefused(reason)
        self._close_transport()

    def _close_transport(self) -> None:
        self._shut = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._shut = True
        if self._transport is not None:
            self._transport.abort()


class SioSocket:
    """One connected Socket.IO socket; its protocol answers pings and dispatches events as they arrive."""

    def __init__(
        self,
        index: int,
        on_event: EventHandler,
        auth: bytes,
        host_header: str,
        path: str,
        recover: bool = False,
    ) -> None:
        self.index = index
        self.sid = ""
        self.pid: str | None = None  # the recovery session of an opted-in socket
        self.recover = recover
        self.offsets = OffsetChecks()
        self._last_offset = (-1, -1)
        self.closed_by_server = False  # the server ended it (or broke the protocol), not close()
        self._on_event = on_event
        self._auth = auth
        self._closing = False
        self._joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next_ack = 0
        key = base64.b64encode(os.urandom(16)).decode()
        request = _upgrade_request(host_header, path, key)
        self._ws = _WebSocket(request, key, self._on_open_packet, self._on_end)

    @classmethod
    async def connect(
        cls,
        session: aiohttp.ClientSession | None,
        base_url: str,
        token: str | None,
        index: int,
        on_event: EventHandler,
        timeout: float = 10.0,
        recover: bool = False,
    ) -> SioSocket:
        """Open the WebSocket, read the open packet, connect the default namespace with auth.

        `recover`: opt in to connection state recovery (auth `"recover": true`); the CONNECT
        reply must then carry a pid, else the connect fails with ConnectRefused.
        `session` is unused (each socket is its own TCP connection); callers pass their REST one.
        """
        host, port, host_header, path = _endpoint(base_url)
        fields: dict[str, Any] = {} if token is None else {"token": token}
        if recover:
            fields["recover"] = True
        auth = orjson.dumps(fields)
        sock = cls(index, on_event, auth, host_header, path, recover)
        ws = sock._ws
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().create_connection(lambda: ws, host, port)
                sock.sid = await sock._joined
        except BaseException:
            sock._closing = True
            ws.abort()
            raise
        return sock

    async def emit(self, event: str, data: Any) -> None:
        self._ws.send_text(b"42" + orjson.dumps([event, data]))

    async def call(self, event: str, data: Any, timeout: float = 10.0) -> Any:
        """Emit with an ack id and return the server's answer (its first argument)."""
        self._next_ack += 1
        ack_id = self._next_ack
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = answer
        self._ws.send_text(b"42" + str(ack_id).encode() + orjson.dumps([event, data]))
        try:
            async with asyncio.timeout(timeout):
                return await answer
        finally:
            self._acks.pop(ack_id, None)

    async def close(self) -> None:
        """Close from our side (a no-op once closed): a closing handshake of at most CLOSE_WAIT."""
        self._closing = True
        self._ws.close()
        _, pending = await asyncio.wait((self._ws.lost,), timeout=CLOSE_WAIT)
        if pending:  # the server never answered our close frame
            self._ws.abort()

    # The handshake: `_ws.on_text` moves from one of these to the next, ending at `_on_message`.

    def _on_open_packet(self, text: Payload) -> None:
        if not text.startswith(b"0"):
            self._refuse(f"expected an Engine.IO open packet, got {bytes(text[:80])!r}")
            return
        self._ws.on_text = self._on_connect_answer
        self._ws.send_text(b"40" + self._auth)

    def _on_connect_answer(self, text: Payload) -> None:
        if text == b"2":
            self._ws.send_text(b"3")
        elif text.startswith(b"44"):
            self._refuse(f"connection refused: {bytes(text[2:200]).decode(errors='replace')}")
        elif not text.startswith(b"40"):
            self._refuse(f"expected a namespace connect, got {bytes(text[:80])!r}")
        else:
            sid, pid = _connect_reply(text)
            if sid is None:
                self._refuse(f"no sid in the namespace connect {bytes(text[:80])!r}")
            elif self.recover and pid is None:
                self._refuse(f"asked for recovery but no pid in the namespace connect {bytes(text[:120])!r}")
            elif not self._joined.done():
                self.pid = pid
                self._ws.on_text = self._on_recoverable_message if self.recover else self._on_message
                self._joined.set_result(sid)

    def _refuse(self, reason: str) -> None:
        if not self._joined.done():
            self._joined.set_exception(ConnectRefused(reason))
        self._closing = True
        self._ws.abort()

    def _on_message(self, text: Payload) -> None:
        if text.startswith(b"42"):
            received = time.monotonic()
            event, *args = orjson.loads(text[2:])
            if len(args) > 1:  # an offset (or anything else) after the data: we did not opt in
                self.offsets.unexpected += 1
            self._on_event(self.index, event, args[0] if args else None, received)
        else:
            self._on_control(text)

    def _on_recoverable_message(self, text: Payload) -> None:
        """`_on_message` of an opted-in socket: `42["event", data, offset]`, offset checked and stripped."""
        if text.startswith(b"42"):
            received = time.monotonic()
            event, *args = orjson.loads(text[2:])
            offset = parse_offset(args[1]) if len(args) == 2 else None
            checks = self.offsets
            if offset is None:
                checks.missing += 1
            else:
                checks.seen += 1
                if offset <= self._last_offset:
                    checks.not_increasing += 1
                self._last_offset = offset
            if event in RECOVERY_NOTICES:
                checks.notices += 1
            self._on_event(self.index, event, args[0] if args else None, received)
        else:
            self._on_control(text)

    def _on_control(self, text: Payload) -> None:
        if text == b"2":
            self._ws.send_text(b"3")
        elif text.startswith(b"43"):  # an ack: 43<id>[args]
            body = bytes(text[2:])
            start = body.find(b"[")
            waiter = self._acks.get(int(body[:start])) if start > 0 and body[:start].isdigit() else None
            if waiter is not None and not waiter.done():
                args = orjson.loads(body[start:])
                waiter.set_result(args[0] if args else None)
        elif text.startswith(b"41") or text == b"1":  # namespace disconnect or Engine.IO close
            self.closed_by_server = True
            self._ws.close()

    def _on_end(self, reason: Exception | None) -> None:
        if not self._joined.done():
            self._joined.set_exception(reason or ConnectRefused("the server closed during the handshake"))
        if not self._closing:
            self.closed_by_server = True

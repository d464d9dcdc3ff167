"""WebSocket frames written once per message and handed to hypercorn in batches, and the
common client frame read without wsproto.

Why: a broadcast sends the same bytes to every recipient, yet through ASGI each socket's copy
pays for an ASGI message, wsproto's framing, hypercorn's stream and protocol layers and one
`write()` system call. Profiles of W3f's receiving instance put two thirds of its CPU there.
Here a message is framed once (server frames are unmasked, so the frame is the same for every
socket) and cached on its Engine.IO packet, and a socket's writer hands everything queued for
it to hypercorn as one write.

How, under hypercorn: `FrameStream` is hypercorn's WebSocket stream with three methods more
(`abort` drops the connection of a peer that answers nothing; the other two write):
`send_frames`, which passes ready frames to the same connection-level send that its own
`websocket.send` ends in (same lock, same flow control), and `write_now`, which writes them to
the connection's transport without a task switch when nothing else is being written there
(HTTP/1.1 under asyncio: what the connection-level send would do, minus a lock nobody holds and
a drain with nothing to wait for). `install()` makes hypercorn's HTTP/1.1
and HTTP/2 protocols create it (the hooks are listed in webapp/private_hooks.py and checked by
tests/test_private_hooks.py). A socket whose ASGI send is not a `FrameStream`'s (another server,
the in-process test client) keeps the plain ASGI path.

Reading: `FrameStream.handle` takes the client's whole, masked, uncompressed message frames
from the bytes to the app's queue, and gives hypercorn's own path (wsproto) the first frame of
any other kind and everything after it (see the class).

Frames written here are never compressed, even where a client negotiated permessage-deflate
(uncompressed messages are valid there: RSV1 clear), as Socket.IO's Node server does by default:
compressing each copy of a broadcast per socket costs more CPU than the bytes it saves on a LAN.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from engineio import packet as eio_packet
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol import h2, h11
from hypercorn.protocol.events import Data, Event
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.connection import ConnectionState

from . import app_queue


class Written:
    """What this process's writers have sent as ready frames: `frames` in `writes` writes
    (their ratio is how much batching saves), `at_once` of those writes made on the spot (no
    queue, no writer task), and whether hypercorn's streams are ours. Reading: `read` messages
    parsed by `FrameStream`'s own reader, and `handed_to_wsproto` connections whose reading
    went back to wsproto (a control frame, a fragment, a compressed or malformed frame)."""

    def __init__(self) -> None:
        self.installed = False
        self.frames = 0
        self.writes = 0
        self.at_once = 0
        self.read = 0
        self.handed_to_wsproto = 0

    def status(self) -> dict[str, Any]:
        return {
            "ready_frames": self.installed,
            "frames": self.frames,
            "writes": self.writes,
            "written_at_once": self.at_once,
            "frames_read": self.read,
            "reads_handed_to_wsproto": self.handed_to_wsproto,
            "lean_receive_queues": app_queue.STARTED.apps,
        }


WRITTEN = Written()

_TEXT, _BINARY = 0x1, 0x2
_FIN = 0x80
_MASKED = 0x80
_WHOLE_MESSAGE = (_FIN | _TEXT, _FIN | _BINARY)  # first bytes the lean reader takes


def frame(payload: bytes, opcode: int = _TEXT) -> bytes:
    """One whole, unmasked WebSocket message frame (RFC 6455 §5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        header = bytes((_FIN | opcode, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, size)
    return header + payload


def frame_of(pkt: eio_packet.Packet) -> bytes:
    """The frame of an Engine.IO packet, built once and kept on it: a broadcast's packet object
    is shared by all its recipients."""
    cached: bytes | None = getattr(pkt, "ws_frame", None)
    if cached is None:
        encoded = pkt.encode()
        if isinstance(encoded, str):
            cached = frame(encoded.encode(), _TEXT)
        else:
            cached = frame(bytes(encoded), _BINARY)
        pkt.ws_frame = cached
    return cached


def masked(payload: bytes, mask: bytes) -> bytes:
    """`payload` XOR the repeated 4-byte `mask` (RFC 6455 §5.3: masking and unmasking are the
    same), as one big-integer operation rather than a byte loop."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


class FrameStream(WSStream):
    """hypercorn's WebSocket stream, able to write messages that are already framed, whose app
    receives from a lean queue (`app_queue.AppQueue`), and which reads the common client frame
    itself.

    Reading: a client's messages nearly always come as one masked frame each (FIN set, no
    extension bits, text or binary). Those go from the bytes to the app's queue here, without
    wsproto's frame and message decoders or hypercorn's message buffer (12 % of W3's asking
    instance's samples went to wsproto; the reader takes 3.5 %). The first frame that is
    anything else (a ping, a close, a fragment, a compressed or malformed frame, one past the
    size cap) and everything after it on the connection go to hypercorn's own path, so wsproto
    answers and refuses exactly as before. It never missed a byte: until then it had seen no
    frame at all, and nothing is half-read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task_group = app_queue.lean_group(self.task_group)
        # Set here, with hypercorn's own attributes: one instance dict, never grown later.
        self._server: TCPServer | None = None
        self._looked_up = False
        self._lean_reads = True  # until a frame only wsproto should read
        # The start of a frame the lean reader waits to complete, and the bytes that frame
        # needs in all (0 while its header is incomplete): a frame trickling in a few bytes
        # per read is appended to, not parsed again at each read.
        self._partial: bytes | bytearray = b""
        self._wanted = 0

    async def handle(self, event: Event) -> None:
        if self._lean_reads and type(event) is Data:
            if self._open():
                await self._read(event.data)
                return
            # Closing, or not yet accepted: hypercorn's path from here on, with what is held.
            self._lean_reads = False
            if self._partial:
                event = Data(stream_id=event.stream_id, data=bytes(self._partial) + event.data)
                self._partial, self._wanted = b"", 0
        await super().handle(event)

    async def _read(self, data: bytes) -> None:
        """Hand each whole client message frame in `data` to the app; keep a frame's start."""
        if self._partial:
            self._partial += data
            if len(self._partial) < self._wanted:
                return
            data, self._partial, self._wanted = bytes(self._partial), b"", 0
        end, at, wanted = len(data), 0, 0
        cap = self.config.websocket_max_message_size
        while end - at >= 2:
            first, second = data[at], data[at + 1]
            if first not in _WHOLE_MESSAGE or not second & _MASKED:
                await self._hand_to_wsproto(data[at:])
                return
            size, start = second & 0x7F, at + 2
            if size == 126:
                if end - start < 2:
                    break
                size, start = int.from_bytes(data[start : start + 2], "big"), start + 2
                minimal = size >= 126
            elif size == 127:
                if end - start < 8:
                    break
                size, start = int.from_bytes(data[start : start + 8], "big"), start + 8
                minimal = size >= 1 << 16 and size < 1 << 63
            else:
                minimal = True
            if not minimal or size > cap:  # wsproto refuses these with the right close code
                await self._hand_to_wsproto(data[at:])
                return
            stop = start + 4 + size
            if stop > end:
                wanted = stop - at
                break
            payload = masked(data[start + 4 : stop], data[start : start + 4])
            message: dict[str, Any]
            if first & 0x0F == _TEXT:
                try:
                    message = {"type": "websocket.receive", "bytes": None, "text": payload.decode()}
                except UnicodeDecodeError:
                    await self._hand_to_wsproto(data[at:])
                    return
            else:
                message = {"type": "websocket.receive", "bytes": payload, "text": None}
            at = stop
            WRITTEN.read += 1
            await self.app_put(message)  # type: ignore[misc]  # set once accepted (_open)
            if not self._open():  # the app closed meanwhile: hypercorn's path for the rest
                await self._hand_to_wsproto(data[at:], counted=False)
                return
        if at < end:
            self._partial, self._wanted = bytearray(data[at:]), wanted

    async def _hand_to_wsproto(self, rest: bytes, *, counted: bool = True) -> None:
        """From now on hypercorn's own path reads this connection, starting with `rest`; counted
        when a frame the reader does not take caused it, not a close of the app's."""
        self._lean_reads = False
        if counted:
            WRITTEN.handed_to_wsproto += 1
        if rest:
            await super().handle(Data(stream_id=self.stream_id, data=rest))

    def _open(self) -> bool:
        return (
            not self.closed
            and self.state == ASGIWebsocketState.CONNECTED
            and self.connection.state is ConnectionState.OPEN  # no close sent or received yet
        )

    async def send_frames(self, data: bytes) -> None:
        """Write whole frames as they are. Dropped once the stream is closing or closed, as
        hypercorn drops an ASGI send then: the reader sees the end and ends the socket."""
        if self._open():
            await self.send(Data(stream_id=self.stream_id, data=data))

    def writes_now(self) -> bool:
        """Whether `write_now` can ever succeed here (asyncio HTTP/1.1, not HTTP/2)."""
        return self._tcp_server() is not None

    def write_now(self, data: bytes) -> bool:
        """Write whole frames to the transport at once, if that is what `send_frames` would do
        without waiting: the stream open, nobody inside the connection's send (so no frame
        written earlier is still on its way), the transport's buffer empty (so flow control has
        nothing to wait for). False: nothing written, use `send_frames`.

        Data frames keep their order. A pong hypercorn is about to send (woken for the lock,
        not yet holding it) may follow frames written here: control frames may come between
        messages (RFC 6455 §5.4)."""
        server = self._tcp_server()
        if server is None or server.send_lock.locked() or not self._open():
            return False
        transport = server.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        try:
            transport.write(data)
        except (ConnectionError, RuntimeError):  # e.g. after write_eof: let hypercorn's send see it
            return False
        return True

    def abort(self) -> bool:
        """Drop the connection at once (a peer that answers nothing, or stopped reading);
        False where this stream has no connection of its own (HTTP/2)."""
        server = self._tcp_server()
        if server is None:
            return False
        server.writer.transport.abort()
        return True

    def _tcp_server(self) -> TCPServer | None:
        """The asyncio connection this stream's HTTP/1.1 protocol sends through (None under
        HTTP/2, where frames share the connection with other streams, or another worker)."""
        if not self._looked_up:
            self._looked_up = True
            protocol = getattr(self.send, "__self__", None)
            server = getattr(getattr(protocol, "send", None), "__self__", None)
            # Not the layout of webapp/private_hooks.py: no writes at once (tests/test_frames.py
            # then fails, since it expects some).
            ok = (
                isinstance(protocol, h11.H11Protocol)
                and isinstance(server, TCPServer)
                and isinstance(getattr(server, "send_lock", None), asyncio.Lock)
            )
            self._server = server if ok else None
        return self._server


def install() -> None:
    """Make hypercorn's HTTP/1.1 and HTTP/2 protocols create `FrameStream`s. Idempotent."""
    for protocol in (h11, h2):
        current = getattr(protocol, "WSStream")  # noqa: B009 - a module global the protocol reads
        if current is FrameStream:
            continue
        if current is not WSStream:
            raise RuntimeError(f"{protocol.__name__}.WSStream is already replaced by {current!r}")
        setattr(protocol, "WSStream", FrameStream)  # noqa: B010
    WRITTEN.installed = True


def stream_of(ws: Any) -> FrameStream | None:
    """The stream behind an engineio ASGI WebSocket, None when that is not a `FrameStream`
    (then the socket writes through ASGI, one message at a time)."""
    stream = getattr(getattr(ws, "asgi_send", None), "__self__", None)
    return stream if isinstance(stream, FrameStream) else None

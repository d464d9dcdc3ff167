"""WebSocket frames written once per message and handed to hypercorn in batches.

Why: a broadcast sends the same bytes to every recipient, yet through ASGI each socket's copy
pays for an ASGI message, wsproto's framing, hypercorn's stream and protocol layers and one
`write()` system call. Profiles of W3f's receiving instance put two thirds of its CPU there.
Here a message is framed once (server frames are unmasked, so the frame is the same for every
socket) and cached on its Engine.IO packet, and a socket's writer hands everything queued for
it to hypercorn as one write.

How, under hypercorn: `FrameStream` is hypercorn's WebSocket stream with one method more,
`send_frames`, which passes ready frames to the same connection-level send that its own
`websocket.send` ends in (same lock, same flow control). `install()` makes hypercorn's HTTP/1.1
and HTTP/2 protocols create it (the hooks are listed in webapp/private_hooks.py and checked by
tests/test_private_hooks.py). A socket whose ASGI send is not a `FrameStream`'s (another server,
the in-process test client) keeps the plain ASGI path.

Frames written here are never compressed, even where a client negotiated permessage-deflate
(uncompressed messages are valid there: RSV1 clear), as Socket.IO's Node server does by default:
compressing each copy of a broadcast per socket costs more CPU than the bytes it saves on a LAN.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

from engineio import packet as eio_packet
from hypercorn.protocol import h2, h11
from hypercorn.protocol.events import Data
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.connection import ConnectionState

FrameSender = Callable[[bytes], Awaitable[None]]


class Written:
    """What this process's writers have sent as ready frames: `frames` in `writes` writes
    (their ratio is how much batching saves), and whether hypercorn's streams are ours."""

    def __init__(self) -> None:
        self.installed = False
        self.frames = 0
        self.writes = 0

    def status(self) -> dict[str, Any]:
        return {"ready_frames": self.installed, "frames": self.frames, "writes": self.writes}


WRITTEN = Written()

_TEXT, _BINARY = 0x1, 0x2
_FIN = 0x80


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


class FrameStream(WSStream):
    """hypercorn's WebSocket stream, able to write messages that are already framed."""

    async def send_frames(self, data: bytes) -> None:
        """Write whole frames as they are. Dropped once the stream is closing or closed, as
        hypercorn drops an ASGI send then: the reader sees the end and ends the socket."""
        if self.closed or self.state != ASGIWebsocketState.CONNECTED:
            return
        if self.connection.state is not ConnectionState.OPEN:  # a close was sent or received
            return
        await self.send(Data(stream_id=self.stream_id, data=data))


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


def sender_of(ws: Any) -> FrameSender | None:
    """`send_frames` of the stream behind an engineio ASGI WebSocket, None when that is not a
    `FrameStream` (then the socket writes through ASGI, one message at a time)."""
    stream = getattr(getattr(ws, "asgi_send", None), "__self__", None)
    return stream.send_frames if isinstance(stream, FrameStream) else None

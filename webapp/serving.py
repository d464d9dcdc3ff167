"""Hypercorn settings the Procfile loads (`--config python:webapp.serving.hypercorn`).

Hypercorn buffers a WebSocket message up to its own limit (16 MiB by default) before the app
sees it; the app's frame cap (twice MAX_PAYLOAD_BYTES: Engine.IO's max_http_buffer_size) is far
lower, so a client could make each connection buffer 16 MiB. The same cap here refuses an
oversized frame before it is buffered. Command-line flags still override these.
"""

from __future__ import annotations

import os

from .config import Settings


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

"""What hypercorn serves: `hypercorn webapp.asgi:app`."""

from __future__ import annotations

import sys

from . import ConfigError, Settings, create_app, gcpolicy, serving
from .realtime import frames, mount

try:
    settings = Settings.from_env()
    serving.check_graceful_timeout(settings, sys.argv)
    app = mount(create_app(settings))
except ConfigError as exc:
    # A clear one-line message instead of a traceback from deep inside the server.
    print(f"webapp: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

gcpolicy.settle()  # this module is the server's entry point: the process is ours to tune
frames.install()  # and its WebSocket streams: broadcasts written as ready frames
serving.release_on_eof()  # and its connections: closed when the client closes, not at keep-alive's end

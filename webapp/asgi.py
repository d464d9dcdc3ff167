"""What hypercorn serves: `hypercorn webapp.asgi:app`."""

from __future__ import annotations

import sys

from . import ConfigError, create_app, gcpolicy
from .realtime import mount

try:
    app = mount(create_app())
except ConfigError as exc:
    # A clear one-line message instead of a traceback from deep inside the server.
    print(f"webapp: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

gcpolicy.settle()  # this module is the server's entry point: the process is ours to tune

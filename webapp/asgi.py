"""What hypercorn serves: `hypercorn webapp.asgi:app`."""

from __future__ import annotations

import sys

from . import ConfigError, create_app
from .realtime import mount

try:
    app = mount(create_app())
except ConfigError as exc:
    # A clear one-line message instead of a traceback from deep inside the server.
    print(f"webapp: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

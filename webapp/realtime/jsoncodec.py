"""orjson to encode Socket.IO packets; the library's own codec to decode them.

python-socketio encodes and decodes every packet with the `json` module it is given (by
default engineio's: the standard library's, refusing integers of over 100 digits). Encoding is
the hot path (every delivery), and orjson does it several times faster; where it refuses
(integers beyond 64 bits) the library's codec takes over, so every packet that went out before
still does. NaN and infinities go out as `null`, on purpose: the bare `NaN` the standard library
writes is rejected by JavaScript's JSON.parse. Decoding stays the library's: orjson would turn
integers beyond 64 bits into floats, silently changing what a client sent.
"""

from __future__ import annotations

from typing import Any

import orjson
from engineio import json as library_json

_OPTIONS = orjson.OPT_NON_STR_KEYS  # the library turns int keys into strings; so must we


def dumps(obj: Any, **kwargs: Any) -> str:
    """Compact JSON text (the separators python-socketio asks for are orjson's only form)."""
    try:
        return orjson.dumps(obj, option=_OPTIONS).decode()
    except TypeError:
        return str(library_json.dumps(obj, **kwargs))  # raises TypeError for what neither can encode


loads = library_json.loads

"""The contract's rules for user ids and event names, shared by every edge."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

USER_ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
_USER_ID_RE = re.compile(USER_ID_PATTERN)

# Room names: a user id's characters and `:` (for namespaced names such as `public:lobby`).
ROOM_PATTERN = r"^[A-Za-z0-9_.@:-]{1,128}$"
_ROOM_RE = re.compile(ROOM_PATTERN)
# What python-socketio sids look like here: `<instance tag>.<random characters>`. The tag
# routes `emit(to=sid)` to the one instance holding the socket, so room names of that shape
# are refused.
SID_TAG_LENGTH = 8
_SID_RE = re.compile(r"^[a-z2-7]{8}\.[A-Za-z0-9_-]{16,32}$")

RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)


def is_user_id(value: object) -> bool:
    """True for 1 to 128 characters of A-Z a-z 0-9 _ . @ -."""
    return isinstance(value, str) and _USER_ID_RE.match(value) is not None and "\n" not in value


def is_room_name(value: object) -> bool:
    """True for 1 to 128 characters of A-Z a-z 0-9 _ . @ - : that do not look like a sid."""
    return (
        isinstance(value, str)
        and _ROOM_RE.match(value) is not None
        and "\n" not in value
        and not looks_like_sid(value)
    )


def looks_like_sid(value: str) -> bool:
    """True when `value` has the shape of a socket id minted by an instance of this project."""
    return _SID_RE.match(value) is not None


def event_name_problem(value: object) -> str | None:
    """Why `value` is not a usable event name, or None when it is."""
    if not isinstance(value, str) or not value:
        return "event must be a non-empty string"
    if len(value) > 128:
        return "event must be at most 128 characters"
    if value in RESERVED_EVENTS:
        return f"event {value!r} is reserved by Socket.IO"
    return None


def _usable_event_name(value: str) -> str:
    problem = event_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


EventName = Annotated[
    str,
    AfterValidator(_usable_event_name),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 128, "not": {"enum": sorted(RESERVED_EVENTS)}}),
]
"""An event name field for pydantic models: validated by the contract's rule."""

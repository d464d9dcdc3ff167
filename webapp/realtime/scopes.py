"""The delivery scopes, one row each: the channel that carries them, who receives them on this
instance, which room names they own, and who may publish to them.

Every other part reads this table: the propagator (channels, recipients, home-channel checks),
the client manager (which `emit(to=...)` target is which scope), envelope validation (which
target field a scope needs), the REST routes and the gateways (names nobody may join or send
to), and the metrics (one label per row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from ..names import is_room_name, is_user_id, looks_like_sid

# The envelope's `scope` field; "sid" is the socket scope's name on the wire.
Scope = Literal["all", "authenticated", "user", "room", "sid"]
# Who may publish to a scope: the backend (an API key, or server code), or a member of it
# through a gateway (`room_send`).
Publisher = Literal["backend", "member"]

AUTHENTICATED_ROOM = "authenticated"
USER_ROOM_PREFIX = "user:"
NODE_PREFIX = "node:"


class Target(Protocol):
    """What names a scope's target: an envelope, or the fields an emit is about to carry."""

    @property
    def user_id(self) -> str | None: ...
    @property
    def room(self) -> str | None: ...
    @property
    def to(self) -> str | None: ...


class Local(Protocol):
    """What a scope's recipients are read from on this instance."""

    def all_sids(self) -> Iterable[str]: ...
    def authenticated_sids(self) -> Iterable[str]: ...
    def sids_of(self, user_id: str) -> Iterable[str]: ...
    def room_members(self, room: str) -> Iterable[str]: ...
    def holds(self, sid: str) -> bool: ...


@dataclass(frozen=True)
class Row:
    """One delivery scope."""

    name: Scope
    # The channel's name after `<prefix>:`, from the target.
    suffix: Callable[[Target], str]
    # The sockets of this instance it reaches (before `skip` and a gateway answer's origin).
    recipients: Callable[[Local, Target], Iterable[str]]
    # Room names this scope owns: nobody joins, leaves or sends to them through a gateway.
    reserves: Callable[[str], bool]
    # Whether the target fields of an envelope are right for this scope.
    valid_target: Callable[[Target], bool]
    published_by: frozenset[Publisher] = frozenset({"backend"})

    def channel(self, prefix: str, target: Target) -> str:
        return f"{prefix}:{self.suffix(target)}"


def _node_of(sid: str | None) -> str:
    """The instance tag a sid starts with: it names the node channel of the instance holding it."""
    return (sid or "").partition(".")[0]


def _nothing(name: str) -> bool:
    return False


ROWS: dict[Scope, Row] = {
    row.name: row
    for row in (
        Row(
            "all",
            suffix=lambda t: "all",
            recipients=lambda local, t: local.all_sids(),
            reserves=_nothing,
            valid_target=lambda t: True,
        ),
        Row(
            "authenticated",
            suffix=lambda t: "authenticated",
            recipients=lambda local, t: local.authenticated_sids(),
            reserves=lambda name: name == AUTHENTICATED_ROOM,
            valid_target=lambda t: True,
        ),
        Row(
            "user",
            suffix=lambda t: f"user:{t.user_id or ''}",
            recipients=lambda local, t: local.sids_of(t.user_id or ""),
            reserves=lambda name: name.startswith(USER_ROOM_PREFIX),
            valid_target=lambda t: is_user_id(t.user_id),
        ),
        Row(
            "room",
            suffix=lambda t: f"room:{t.room or ''}",
            recipients=lambda local, t: local.room_members(t.room or ""),
            reserves=_nothing,  # every other valid name is a room
            valid_target=lambda t: is_room_name(t.room),
            published_by=frozenset({"backend", "member"}),
        ),
        # One socket, through the node channel of the instance holding it (its sid's tag).
        # That channel also carries ops for the instance's sockets, so both shapes are owned.
        Row(
            "sid",
            suffix=lambda t: f"{NODE_PREFIX}{_node_of(t.to)}",
            recipients=lambda local, t: [t.to] if t.to is not None and local.holds(t.to) else [],
            reserves=lambda name: looks_like_sid(name) or name.startswith(NODE_PREFIX),
            valid_target=lambda t: isinstance(t.to, str) and looks_like_sid(t.to),
        ),
    )
}


def row(scope: Scope) -> Row:
    return ROWS[scope]


def reserved(name: str) -> bool:
    """True for a room name a delivery scope owns (`authenticated`, `user:*`, sid- and
    node-shaped names): no gateway, policy or REST call puts a socket in it by hand."""
    return any(r.reserves(name) for r in ROWS.values())


def member_may_publish(scope: Scope) -> bool:
    """Whether a socket may publish to the scope through a gateway (else only the backend may)."""
    return "member" in ROWS[scope].published_by


@dataclass(frozen=True)
class Named:
    """A target given field by field (for channels of emits not yet enveloped)."""

    user_id: str | None = None
    room: str | None = None
    to: str | None = None


def channel(prefix: str, scope: Scope, *, user_id: str | None = None, room: str | None = None,
            to: str | None = None) -> str:
    """The channel that carries `scope` to the given target."""
    return ROWS[scope].channel(prefix, Named(user_id, room, to))


def scope_of_room(name: str) -> tuple[Scope, Named]:
    """Which scope python-socketio's `emit(to=name)` means: a scope's own room, a sid, or a room."""
    if name == AUTHENTICATED_ROOM:
        return "authenticated", Named()
    if name.startswith(USER_ROOM_PREFIX) and is_user_id(name[len(USER_ROOM_PREFIX):]):
        return "user", Named(user_id=name[len(USER_ROOM_PREFIX):])
    if looks_like_sid(name):
        return "sid", Named(to=name)
    return "room", Named(room=name)

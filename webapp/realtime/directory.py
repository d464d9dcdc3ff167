"""What the backend decided about each user, in one Redis hash per user, read once per handshake:
the rooms it gave them (`room:<name>` fields) and when their tokens were last revoked
(`not_before`). Every instance sees the same record.

"Not before" is a moment on Redis's clock (`Bus.clock_ms`), and so is every token's `iat` minted
by an instance (the extension gives its signer that clock): the revoking host's clock and the
minting host's never meet. The two ends agree within each instance's error on Redis's clock:
half the round trip of its last TIME (at boot and at every subscriber reconnect) plus how far
its own clock drifted since, milliseconds on a LAN. No tolerance is added on top: one wide
enough for hosts' clocks would let tokens minted before the revocation through."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..auth.tokens import Claims
from ..names import is_room_name
from .bus import Bus, BusUnavailable

log = logging.getLogger(__name__)

_ROOM = "room:"
_NOT_BEFORE = "not_before"


@dataclass(frozen=True)
class UserRecord:
    rooms: set[str] = field(default_factory=set)
    not_before: float | None = None

    def allows(self, claims: Claims) -> bool:
        """False for a token minted before the user's last revocation (or minted without `iat`)."""
        if self.not_before is None:
            return True
        return claims.issued_at is not None and claims.issued_at >= self.not_before


class UserDirectory:
    def __init__(self, bus: Bus, prefix: str) -> None:
        self._bus = bus
        self._prefix = f"{prefix}:users:"

    def _key(self, user_id: str) -> str:
        return self._prefix + user_id

    async def record(self, user_id: str) -> UserRecord:
        """The user's record; raises BusUnavailable when Redis does not answer."""
        fields = await self._bus.fields(self._key(user_id))
        rooms = {name[len(_ROOM):] for name in fields if name.startswith(_ROOM) and is_room_name(name[len(_ROOM):])}
        try:
            not_before = float(fields[_NOT_BEFORE]) if _NOT_BEFORE in fields else None
        except ValueError:
            not_before = None
        return UserRecord(rooms, not_before)

    async def record_or_empty(self, user_id: str) -> UserRecord:
        """The record, or an empty one while Redis cannot be read: the outage mode accepts sockets
        (without their stored rooms), and a revocation is enforced again once Redis is back."""
        try:
            return await self.record(user_id)
        except BusUnavailable as exc:
            log.warning("could not read the record of %s: %s", user_id, exc)
            return UserRecord()

    async def rooms(self, user_id: str) -> set[str]:
        return (await self.record(user_id)).rooms

    async def add_room(self, user_id: str, room: str) -> bool:
        """Store that `user_id` is in `room`; True when it was not before."""
        return await self._bus.set_field(self._key(user_id), _ROOM + room, "1")

    async def remove_room(self, user_id: str, room: str) -> bool:
        """Store that `user_id` is no longer in `room`; True when it was."""
        return await self._bus.delete_field(self._key(user_id), _ROOM + room)

    async def revoke(self, user_id: str) -> float:
        """Refuse from now on the user's tokens minted before now; returns that moment (on
        Redis's clock, as the tokens' `iat`)."""
        now = self._bus.clock_ms() / 1000
        await self._bus.set_field(self._key(user_id), _NOT_BEFORE, repr(now))
        return now

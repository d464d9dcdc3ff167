"""Rooms the backend gives users, and who may join a room from a socket."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from .bus import Bus

# Decides whether a socket's user (None: anonymous) may join a room with the `join` event.
JoinPolicy = Callable[[str | None, str], bool | Awaitable[bool]]


def nobody(user_id: str | None, room: str) -> bool:
    """The default policy: sockets join nothing by themselves; the backend puts users in rooms."""
    return False


async def allowed(policy: JoinPolicy, user_id: str | None, room: str) -> bool:
    """Ask a policy, sync or async; anything but True is a refusal."""
    verdict = policy(user_id, room)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return verdict is True


class Memberships:
    """The rooms the backend put each user in, kept in the bus's store (Redis) so every
    instance puts that user's new sockets in them too, until the backend takes them out."""

    def __init__(self, bus: Bus, prefix: str) -> None:
        self._bus = bus
        self._prefix = f"{prefix}:memberships:"

    def _key(self, user_id: str) -> str:
        return self._prefix + user_id

    async def of(self, user_id: str) -> set[str]:
        return await self._bus.members(self._key(user_id))

    async def add(self, user_id: str, room: str) -> bool:
        """Store that `user_id` is in `room`; True when it was not before."""
        return await self._bus.add_member(self._key(user_id), room)

    async def remove(self, user_id: str, room: str) -> bool:
        """Store that `user_id` is no longer in `room`; True when it was."""
        return await self._bus.remove_member(self._key(user_id), room)

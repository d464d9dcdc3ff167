"""Who may join a room from a socket: the join policy."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

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

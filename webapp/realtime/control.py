"""User control: revoking a user's tokens fleet-wide, and ending sockets whose token expired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ..auth.tokens import Claims
from .bus import Bus

EXPIRY_NOTICE = 30.0  # seconds of warning (`token_expiring`) before an expired token's socket is closed


class Revocations:
    """A per-user "not before" in the bus's store: tokens of that user minted earlier are refused
    at handshake by every instance. Kept as long as a token can live, after which every token
    minted before it has expired anyway."""

    def __init__(self, bus: Bus, prefix: str, max_token_ttl: float) -> None:
        self._bus = bus
        self._prefix = f"{prefix}:revoked:"
        self._ttl = max_token_ttl

    async def revoke(self, user_id: str) -> float:
        """Refuse from now on the tokens of `user_id` minted before now; returns that moment."""
        now = time.time()
        await self._bus.remember(self._prefix + user_id, repr(now).encode(), self._ttl)
        return now

    async def allows(self, claims: Claims) -> bool:
        """False for a token minted before its user's revocation (BusUnavailable if unreadable)."""
        raw = await self._bus.recall(self._prefix + claims.user_id)
        if raw is None:
            return True
        try:
            not_before = float(raw)
        except ValueError:
            return True
        return claims.issued_at is not None and claims.issued_at >= not_before


class ExpiryWatch:
    """Warns a socket `EXPIRY_NOTICE` seconds before its token expires, then ends it."""

    def __init__(
        self, warn: Callable[[str, int], None], end: Callable[[str], None], notice: float = EXPIRY_NOTICE
    ) -> None:
        self._warn = warn
        self._end = end
        self._notice = notice
        self._timers: dict[str, list[asyncio.TimerHandle]] = {}

    def watch(self, sid: str, expires_at: int) -> None:
        loop = asyncio.get_running_loop()
        left = expires_at - time.time()
        timers = [loop.call_later(max(0.0, left), self._expired, sid)]
        if left > self._notice:
            timers.append(loop.call_later(left - self._notice, self._warn, sid, expires_at))
        else:
            self._warn(sid, expires_at)
        self._timers[sid] = timers

    def forget(self, sid: str) -> None:
        for timer in self._timers.pop(sid, ()):
            timer.cancel()

    def _expired(self, sid: str) -> None:
        self._timers.pop(sid, None)
        self._end(sid)

    def __len__(self) -> int:
        return len(self._timers)


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).isoformat().replace("+00:00", "Z")

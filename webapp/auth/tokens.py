"""Expiring signed socket tokens: any instance sharing SECRET_KEY verifies them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from itsdangerous import BadSignature, URLSafeSerializer

from ..names import is_user_id

_SALT = "webapp.socket-token.v1"


def signed_serializer(keys: str | Sequence[str], salt: str) -> URLSafeSerializer:
    """An HMAC-SHA256 serializer. With several keys the first signs and every one verifies
    (SECRET_KEYS, for rotation); values signed before the upgrade with itsdangerous's default,
    HMAC-SHA1, still verify, so live tokens and sessions survive it."""
    ordered = [keys] if isinstance(keys, str) else list(keys)
    return URLSafeSerializer(
        list(reversed(ordered)),  # itsdangerous signs with the last key of its list
        salt=salt,
        signer_kwargs={"digest_method": hashlib.sha256},
        fallback_signers=[{"digest_method": hashlib.sha1}],
    )


class InvalidToken(ValueError):
    """The token is malformed, tampered with, signed with another key or expired."""


@dataclass(frozen=True)
class Claims:
    """What a valid token proves: who, since when (None for tokens minted before `iat`), until when."""

    user_id: str
    issued_at: float | None
    expires_at: int


@dataclass(frozen=True)
class Token:
    value: str
    user_id: str
    expires_at: float

    @property
    def expires_at_iso(self) -> str:
        return datetime.fromtimestamp(self.expires_at, tz=UTC).isoformat().replace("+00:00", "Z")


class TokenSigner:
    """Mints and verifies tokens; the signature check is constant-time (HMAC).

    `clock` (seconds) dates each token's `iat`, which a revocation's "not before" is compared
    with: the realtime extension sets it to Redis's clock, the one its revocations are stamped
    with, so the hosts' own clocks never meet in that comparison. A signer outside the fleet
    keeps its host's clock (then keep that host on NTP with Redis's)."""

    def __init__(self, secret_keys: str | Sequence[str], clock: Callable[[], float] = time.time) -> None:
        self._serializer = signed_serializer(secret_keys, _SALT)
        self.clock = clock

    def mint(self, user_id: str, ttl: int, now: float | None = None) -> Token:
        if not is_user_id(user_id):
            raise ValueError("invalid user id")
        # `exp` on this host's clock, as `claims` checks it here; `iat` on the signer's clock.
        expires_at = int((time.time() if now is None else now) + ttl)
        issued_at = self.clock() if now is None else now
        # `iat` in milliseconds: a revocation refuses the tokens minted before it.
        value = self._serializer.dumps({"sub": user_id, "exp": expires_at, "iat": int(issued_at * 1000)})
        return Token(value=value, user_id=user_id, expires_at=expires_at)

    def verify(self, value: object, now: float | None = None) -> str:
        """Return the token's user id or raise InvalidToken."""
        return self.claims(value, now).user_id

    def claims(self, value: object, now: float | None = None) -> Claims:
        """Return what the token proves or raise InvalidToken."""
        if not isinstance(value, str) or not value or len(value) > 1024:
            raise InvalidToken("token is not a string of a sane length")
        try:
            claims = self._serializer.loads(value)
        except BadSignature:
            raise InvalidToken("token signature is invalid") from None
        if not isinstance(claims, dict):
            raise InvalidToken("token payload is malformed")
        user_id, expires_at = claims.get("sub"), claims.get("exp")
        if not is_user_id(user_id) or not isinstance(expires_at, int):
            raise InvalidToken("token payload is malformed")
        if expires_at <= (time.time() if now is None else now):
            raise InvalidToken("token has expired")
        issued_ms = claims.get("iat")
        issued_at = issued_ms / 1000 if isinstance(issued_ms, int) and not isinstance(issued_ms, bool) else None
        return Claims(user_id, issued_at, expires_at)  # type: ignore[arg-type]

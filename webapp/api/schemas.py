"""Request bodies of the REST hooks, validated at the edge."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..names import USER_ID_PATTERN, EventName


class EmitIn(BaseModel):
    """`{"event": E, "data": any JSON}`."""

    model_config = ConfigDict(extra="forbid")

    event: EventName
    data: Any = None


class TokenIn(BaseModel):
    """`{"user_id": U, "ttl": seconds?}`."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(pattern=USER_ID_PATTERN)
    ttl: int | None = Field(default=None, ge=10)


class DisconnectIn(BaseModel):
    """`{"reason": "..."}`: told to each socket in a `disconnect_reason` event."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="disconnected by the server", min_length=1, max_length=256)


class PresenceIn(BaseModel):
    """`{"user_ids": [...]}`: up to 1,000 users in one call."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[Annotated[str, Field(pattern=USER_ID_PATTERN)]] = Field(min_length=1, max_length=1000)

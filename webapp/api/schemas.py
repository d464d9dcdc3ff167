"""Request bodies of the REST hooks, validated at the edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..names import USER_ID_PATTERN, EventName, is_room_name
from ..realtime.propagator import reserved_room

UserId = Annotated[str, Field(pattern=USER_ID_PATTERN)]


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

    user_ids: list[UserId] = Field(min_length=1, max_length=1000)


class BatchItem(BaseModel):
    """One event of a batch: a scope, its target (a user or a room), the event and its data."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["all", "authenticated", "user", "room"]
    user_id: UserId | None = None
    room: str | None = None
    event: EventName
    data: Any = None

    @model_validator(mode="after")
    def _target_matches_scope(self) -> BatchItem:
        if (self.scope == "user") != (self.user_id is not None):
            raise ValueError("user_id is required with scope user, and only with it")
        if (self.scope == "room") != (self.room is not None):
            raise ValueError("room is required with scope room, and only with it")
        if self.room is not None and (not is_room_name(self.room) or reserved_room(self.room)):
            raise ValueError("room: 1-128 characters of A-Z a-z 0-9 _ . @ - :, not a scope's own room")
        return self


class BatchIn(BaseModel):
    """`{"events": [...]}`: up to MAX_BATCH events, mixed scopes, all or nothing."""

    model_config = ConfigDict(extra="forbid")

    events: list[BatchItem] = Field(min_length=1)


class UsersEmitIn(BaseModel):
    """`{"user_ids": [...], "event": E, "data": any JSON}`: one event to many users."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1)
    event: EventName
    data: Any = None

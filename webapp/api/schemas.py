"""Request bodies of the REST hooks, validated at the edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from ..config import MAX_TOKEN_TTL
from ..names import ROOM_PATTERN, USER_ID_PATTERN, EventName, is_room_name
from ..realtime import scopes

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
    ttl: int | None = Field(default=None, ge=10, le=MAX_TOKEN_TTL)


class DisconnectIn(BaseModel):
    """`{"reason": "..."}`: told to each socket in a `disconnect_reason` event."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="disconnected by the server", min_length=1, max_length=256)


class PresenceIn(BaseModel):
    """`{"user_ids": [...]}`: up to 1,000 users in one call."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1, max_length=1000)


def _usable_room(value: str) -> str:
    if not is_room_name(value) or scopes.reserved(value):
        raise ValueError("1-128 characters of A-Z a-z 0-9 _ . @ - :, not a scope's own room")
    return value


RoomName = Annotated[str, AfterValidator(_usable_room), WithJsonSchema({"type": "string", "pattern": ROOM_PATTERN})]


class _BatchEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event: EventName
    data: Any = None


class ToAll(_BatchEvent):
    """To every open connection."""

    scope: Literal["all"]


class ToAuthenticated(_BatchEvent):
    """To every connection that has a user."""

    scope: Literal["authenticated"]


class ToUser(_BatchEvent):
    """To every socket of one user."""

    scope: Literal["user"]
    user_id: UserId


class ToRoom(_BatchEvent):
    """To every socket in one room."""

    scope: Literal["room"]
    room: RoomName


# One event of a batch: its scope says which target field it carries (none, user_id or room).
BatchItem = Annotated[ToAll | ToAuthenticated | ToUser | ToRoom, Field(discriminator="scope")]


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

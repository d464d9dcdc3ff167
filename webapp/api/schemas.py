"""Request bodies of the REST hooks, validated at the edge."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..names import USER_ID_PATTERN, event_name_problem


class EmitIn(BaseModel):
    """`{"event": E, "data": any JSON}`."""

    model_config = ConfigDict(extra="forbid")

    event: str
    data: Any = None

    @field_validator("event")
    @classmethod
    def _usable(cls, value: str) -> str:
        problem = event_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class TokenIn(BaseModel):
    """`{"user_id": U, "ttl": seconds?}`."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(pattern=USER_ID_PATTERN)
    ttl: int | None = Field(default=None, ge=10)

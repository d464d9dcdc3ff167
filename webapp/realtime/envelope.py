"""The JSON envelope every event travels in across instances (never pickle)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..names import EventName, is_user_id

Scope = Literal["all", "authenticated", "user"]


class Origin(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    instance: str | None = None
    sid: str | None = None


class Envelope(BaseModel):
    """One event on its way to every instance that holds a receiving socket."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1]
    id: str
    scope: Scope
    event: EventName
    data: Any = None
    user_id: str | None = None
    origin: Origin = Origin()
    ts: float

    @model_validator(mode="after")
    def _user_matches_scope(self) -> Envelope:
        if self.scope == "user" and not is_user_id(self.user_id):
            raise ValueError("a user envelope needs a valid user_id")
        return self


class BadEnvelope(ValueError):
    """Raw bytes that are not a valid envelope."""


def make(
    scope: Scope,
    event: str,
    data: Any,
    *,
    user_id: str | None = None,
    instance: str,
    sid: str | None = None,
) -> tuple[str, bytes]:
    """Build an envelope; return its id and its wire bytes."""
    envelope_id = uuid.uuid4().hex
    body = {
        "v": 1,
        "id": envelope_id,
        "scope": scope,
        "event": event,
        "data": data,
        "user_id": user_id,
        "origin": {"instance": instance, "sid": sid},
        "ts": time.time(),
    }
    return envelope_id, orjson.dumps(body)


def parse(raw: bytes | str) -> Envelope:
    """Validate wire bytes into an Envelope or raise BadEnvelope."""
    try:
        return Envelope.model_validate_json(raw)
    except ValidationError as exc:
        raise BadEnvelope(_summary(exc)) from None


def _summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "envelope"
    return f"{where}: {first['msg']}"

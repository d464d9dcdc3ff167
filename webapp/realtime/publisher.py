"""Publishing for every instance: events to each scope, and the ops that change sockets
(join, leave, close, disconnect), enveloped, handed to the bus, counted and timed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from . import envelope, scopes
from .bus import Bus, BusUnavailable
from .outbox import Outbox


class Outgoing(NamedTuple):
    """An event encoded for the bus, not yet published."""

    envelope_id: str
    channel: str
    raw: bytes


class Publisher:
    """Envelopes events for a scope's channel and publishes them; gateway answers go through
    the outbox, which holds them while the bus is down."""

    def __init__(self, bus: Bus, prefix: str, instance_id: str, outbox: Outbox) -> None:
        self.bus = bus
        self.prefix = prefix
        self.instance_id = instance_id
        self.outbox = outbox
        # For metrics: outcomes, and an optional timer (webapp/metrics.py sets it; None costs nothing).
        self.publishes: Counter[str] = Counter()
        self.observe_publish: Callable[[float], None] | None = None

    def start(self) -> None:
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()

    def addressed(
        self,
        scope: scopes.Scope,
        event: str | None,
        data: Any,
        *,
        user_id: str | None = None,
        room: str | None = None,
        to: str | None = None,
        skip: Iterable[str] = (),
        origin_sid: str | None = None,
        **op: Any,
    ) -> Outgoing:
        """Encode an event (or, with `op=`, an op) for a scope's channel; TypeError for data
        JSON cannot carry."""
        channel = scopes.channel(self.prefix, scope, user_id=user_id, room=room, to=to)
        envelope_id, raw = envelope.make(
            scope, event, data, user_id=user_id, instance=self.instance_id, sid=origin_sid,
            room=room, to=to, skip=list(skip), **op,
        )
        return Outgoing(envelope_id, channel, raw)

    async def publish(self, outgoing: Outgoing) -> str:
        """Publish one encoded event; its envelope id. BusUnavailable if the bus did not confirm it."""
        started = time.perf_counter()
        try:
            await self.bus.publish(outgoing.channel, outgoing.raw)
        except BusUnavailable:
            self.publishes["unavailable"] += 1
            raise
        self.publishes["ok"] += 1
        if self.observe_publish is not None:
            self.observe_publish(time.perf_counter() - started)
        return outgoing.envelope_id

    async def publish_many(self, outgoing: list[Outgoing]) -> None:
        """Publish encoded events together (the bus sends concurrent publishes in one round
        trip); BusUnavailable if the bus did not confirm every one of them."""
        results = await asyncio.gather(*(self.publish(item) for item in outgoing), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def emit_to_user(
        self, user_id: str, event: str, data: Any, *, origin_sid: str | None = None, skip: Iterable[str] = ()
    ) -> str:
        """Send to every socket of `user_id` on every instance, except `origin_sid` and `skip`."""
        return await self.publish(self.addressed("user", event, data, user_id=user_id, origin_sid=origin_sid, skip=skip))

    async def emit_to_all(self, event: str, data: Any, *, skip: Iterable[str] = ()) -> str:
        """Send to every connected socket on every instance, anonymous ones included."""
        return await self.publish(self.addressed("all", event, data, skip=skip))

    async def emit_to_authenticated(self, event: str, data: Any, *, skip: Iterable[str] = ()) -> str:
        """Send to every socket that has a user, on every instance."""
        return await self.publish(self.addressed("authenticated", event, data, skip=skip))

    async def emit_to_room(self, room: str, event: str, data: Any, *, skip: Iterable[str] = ()) -> str:
        """Send to every socket in `room` on every instance; only instances holding one wake."""
        return await self.publish(self.addressed("room", event, data, room=room, skip=skip))

    async def emit_to_sid(self, sid: str, event: str, data: Any) -> str:
        """Send to one socket held by another instance, through that instance's own channel."""
        return await self.publish(self.addressed("sid", event, data, to=sid))

    async def publish_op(
        self,
        op: envelope.Op,
        *,
        user_id: str | None = None,
        room: str | None = None,
        to: str | None = None,
        reason: str | None = None,
    ) -> str:
        """Ask every instance to change sockets: the sockets of `user_id`, socket `to`, or the
        sockets in `room` join or leave `room`, leave a closed room, or are disconnected."""
        scope: scopes.Scope
        if to is not None:
            scope = "sid"
        elif user_id is not None:
            scope = "user"
        elif room is not None:
            scope = "room"
        else:
            raise ValueError("an op needs a user, a socket or a room")
        return await self.publish(
            self.addressed(scope, None, None, user_id=user_id, room=room, to=to, op=op, reason=reason)
        )

    def answer_envelope(self, user_id: str, event: str, data: Any, origin_sid: str) -> bytes:
        """Encode an answer for the user's other sockets (raises TypeError for non-JSON data)."""
        return self.addressed("user", event, data, user_id=user_id, origin_sid=origin_sid).raw

    async def propagate_answer(self, user_id: str, raw: bytes) -> bool:
        """Publish a gateway answer already encoded as an envelope; held in the outbox while
        the bus is down. False when the outbox had to drop it."""
        return await self.outbox.publish(scopes.channel(self.prefix, "user", user_id=user_id), raw)

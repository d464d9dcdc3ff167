"""python-socketio's client manager: its documented seam for servers that work as a fleet.

Through it, python-socketio's own API acts on every instance:

- `sio.emit(event, data, to=room | sid, skip_sid=...)`: no target is a broadcast (`all`),
  `user:<id>` and `authenticated` are the scopes' rooms, a sid is routed to the one instance
  holding it (its tag says which), anything else is a room of the whole fleet.
- `sio.enter_room`, `sio.leave_room`: for a socket here, the room's channel is held (confirmed
  by Redis) before they return; for a socket elsewhere, they ask its instance and return once
  the bus took the request.
- `sio.close_room(room)`: every instance takes its sockets out of the room.
- `sio.disconnect(sid)`: the instance holding the socket disconnects it.
- `sio.rooms(sid)`: the rooms of a socket held here (python-socketio's call is synchronous).

Only the default namespace `/` spans the fleet; other namespaces stay local, as stock.
Acks (`callback=`) work for a socket held here; for any other target python-socketio would
wait for answers that cannot come, so they are refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import socketio

from ..names import is_room_name, looks_like_sid
from . import scopes
from .propagator import NAMESPACE

if TYPE_CHECKING:
    from .propagator import Propagator


class FleetManager(socketio.AsyncManager):
    """The library's manager with rooms, emits and disconnects that reach every instance."""

    def __init__(self) -> None:
        super().__init__()
        # Called right after python-socketio sent a socket's CONNECT reply: its missed events
        # (recovery) and anything delivered to it during its handshake can only go out then.
        self.on_connected: Callable[[str], Awaitable[None]] | None = None
        self.fleet: Propagator | None = None
        # (namespace, sid) -> its rooms. The library finds a socket's rooms by scanning every
        # room of the namespace (each socket has its own, and here each user too), so each
        # disconnect cost O(all rooms): 3,000 sockets leaving at once took 10 s of CPU.
        self._index: dict[tuple[str, str], set[Any]] = {}

    def _propagator(self) -> Propagator:
        if self.fleet is None:
            raise RuntimeError("the manager is not wired to a propagator yet")
        return self.fleet

    def holds(self, sid: str, namespace: str = NAMESPACE) -> bool:
        """True when the socket is on this instance (connected or still connecting)."""
        return self.eio_sid_from_sid(sid, namespace) is not None

    def is_remote_sid(self, target: str) -> bool:
        fleet = self._propagator()
        return looks_like_sid(target) and target.partition(".")[0] != fleet.sid_tag

    # --- the room table, indexed by socket ---------------------------------------------------------

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._index.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        rooms = self._index.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._index[namespace, sid]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        return [room for room in self._index.get((namespace, sid), ()) if room is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """The library's, leaving only the socket's own rooms instead of scanning them all."""
        for room in list(self._index.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            waiting = pending.get(namespace)
            if waiting is not None and sid in waiting:
                waiting.remove(sid)
                if not waiting:
                    del pending[namespace]

    # --- python-socketio's API, fleet-wide ----------------------------------------------------------

    async def connect(self, sid: str, namespace: str) -> Any:
        result = await super().connect(sid, namespace)
        if self.on_connected is not None and namespace == NAMESPACE:
            await self.on_connected(sid)
        return result

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        target = to if to is not None else room
        if namespace != NAMESPACE:
            await super().emit(event, data, namespace, room=target, skip_sid=skip_sid, callback=callback, **kwargs)
            return
        if isinstance(target, str) and self.holds(target):
            if callback is not None or isinstance(data, tuple):
                await super().emit(event, data, namespace, room=target, skip_sid=skip_sid, callback=callback)
            elif target not in _as_list(skip_sid):
                self._propagator().send([target], event, data)
            return
        if callback is not None:
            raise ValueError(
                "acks (callback=) work only for a socket held by this instance; "
                "an emit to a room, a broadcast or a socket elsewhere cannot wait for answers"
            )
        if isinstance(data, tuple):
            raise TypeError("an emit across instances carries one JSON value, not a tuple of arguments")
        if target is not None and not isinstance(target, str):
            raise TypeError("emit to one room or one sid at a time across instances")
        skip = _as_list(skip_sid)
        fleet = self._propagator()
        if target is None:
            await fleet.publisher.emit_to_all(event, data, skip=skip)
            return
        scope, named = scopes.scope_of_room(target)
        if scope == "authenticated":
            await fleet.publisher.emit_to_authenticated(event, data, skip=skip)
        elif scope == "user":
            await fleet.publisher.emit_to_user(named.user_id or "", event, data, skip=skip)
        elif scope == "sid":
            if self.is_remote_sid(target) and target not in skip:
                await fleet.publisher.emit_to_sid(target, event, data)
            # else one of ours that is gone: nobody to send to, as stock
        else:
            await fleet.publisher.emit_to_room(_room(target), event, data, skip=skip)

    async def can_disconnect(self, sid: str, namespace: str) -> bool:
        if self.is_connected(sid, namespace) or namespace != NAMESPACE:
            return bool(self.is_connected(sid, namespace))
        if self.is_remote_sid(sid):
            await self._propagator().publisher.publish_op("disconnect", to=sid, reason="disconnected by the server")
        return False

    async def disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        rooms = self._propagator().rooms_of(sid) if namespace == NAMESPACE else []
        await super().disconnect(sid, namespace, **kwargs)
        for room in rooms:
            await self._propagator().release_room(room)

    async def enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        if namespace != NAMESPACE:
            await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
            return
        room = _room(room)
        if self.holds(sid):
            await self._propagator().enter_room(sid, room)
        elif self.is_remote_sid(sid):
            await self._propagator().publisher.publish_op("join", to=sid, room=room)

    async def leave_room(self, sid: str, namespace: str, room: Any) -> None:
        if namespace != NAMESPACE:
            await super().leave_room(sid, namespace, room)
            return
        room = _room(room)
        if self.holds(sid):
            await self._propagator().leave_room(sid, room)
        elif self.is_remote_sid(sid):
            await self._propagator().publisher.publish_op("leave", to=sid, room=room)

    async def close_room(self, room: Any, namespace: str) -> None:
        if namespace != NAMESPACE:
            await super().close_room(room, namespace)
            return
        room = _room(room)
        fleet = self._propagator()
        for sid, _ in list(self.get_participants(namespace, room)):
            await fleet.leave_room(sid, room)
        await fleet.publisher.publish_op("close", room=room)


def _room(room: Any) -> str:
    """A room this fleet can carry: a valid name the scopes do not own."""
    if not is_room_name(room):
        raise ValueError("a room name is 1-128 characters of A-Z a-z 0-9 _ . @ - : and not shaped like a sid")
    if scopes.reserved(room):
        raise ValueError(f"the room {room!r} belongs to a delivery scope; it is joined and left automatically")
    return str(room)


def _as_list(skip_sid: Any) -> list[str]:
    if skip_sid is None:
        return []
    if isinstance(skip_sid, str):
        return [skip_sid]
    return [sid for sid in skip_sid if isinstance(sid, str)]

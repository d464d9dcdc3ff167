"""The app as served, plus socket events that call python-socketio's own API, so tests can
check that `sio.emit(to=...)`, `enter_room`, `close_room` and `disconnect` act fleet-wide.

Served by tests only: `hypercorn tests.fleet_app:app`.
"""

from __future__ import annotations

from typing import Any

from webapp import create_app
from webapp.realtime import Realtime, mount

quart_app = create_app()
realtime: Realtime = quart_app.extensions["realtime"]
sio = realtime.sio


async def _call(work: Any) -> dict[str, Any]:
    try:
        result = await work
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    return {"ok": True, "result": result}


@sio.event
async def api_emit(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    skip = sid if data.get("skip_me") else data.get("skip")
    return await _call(sio.emit(data["event"], data.get("data"), to=data.get("to"), skip_sid=skip))


@sio.event
async def api_emit_with_ack(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    return await _call(sio.emit("asked", 1, to=data["to"], callback=lambda *answer: None))


@sio.event
async def api_enter(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    return await _call(sio.enter_room(data.get("sid", sid), data["room"]))


@sio.event
async def api_leave(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    return await _call(sio.leave_room(data.get("sid", sid), data["room"]))


@sio.event
async def api_close(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    return await _call(sio.close_room(data["room"]))


@sio.event
async def api_disconnect(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    return await _call(sio.disconnect(data["sid"]))


@sio.event
async def api_rooms(sid: str, data: dict[str, Any] | None = None) -> list[str]:
    return sorted(str(room) for room in sio.rooms((data or {}).get("sid", sid)))


app = mount(quart_app)

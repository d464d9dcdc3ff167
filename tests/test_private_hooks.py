"""Fails loudly when a library moves a private hook we override or call (webapp/private_hooks.py)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from webapp.private_hooks import HOOKS, Hook


@pytest.mark.parametrize("hook", HOOKS, ids=[hook.target for hook in HOOKS])
def test_the_hook_is_where_it_was_checked(hook: Hook) -> None:
    module_name, _, path = hook.target.partition(":")
    owner: object = importlib.import_module(module_name)
    for part in path.split("."):
        assert hasattr(owner, part), f"{hook.target} is gone (checked on {hook.checked_on}; used by {hook.used_by})"
        owner = getattr(owner, part)
    if hook.parameters is not None:
        assert callable(owner), f"{hook.target} is no longer callable"
        names = tuple(inspect.signature(owner).parameters)
        assert names == hook.parameters, (
            f"{hook.target} changed its signature to {names} (checked on {hook.checked_on}; used by {hook.used_by})"
        )


def test_a_connection_holds_its_keep_alive_timer_where_release_on_eof_stops_it() -> None:
    # serving.release_on_eof stops `idle_task` once `_read_data` returns; TCPServer.__init__
    # only stores what it is given, so it can be built here without a connection.
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.asyncio.worker_context import AsyncioSingleTask
    from hypercorn.config import Config

    from webapp import serving

    server = TCPServer(None, None, Config(), None, None, None, None)  # type: ignore[arg-type]
    assert isinstance(server.idle_task, AsyncioSingleTask)
    serving.release_on_eof()
    serving.release_on_eof()  # idempotent: wrapped once
    assert getattr(TCPServer._read_data, "releases_on_eof", False)
    assert inspect.signature(TCPServer._read_data).parameters.keys() == {"self"}


def test_the_managers_room_table_has_the_layout_the_propagator_reads() -> None:
    # propagator.Propagator._members_here reads `manager.rooms[namespace][room]` (no copy per check).
    import socketio

    manager = socketio.AsyncManager()
    manager.basic_enter_room("sid1", "/", None, eio_sid="eio1")
    manager.basic_enter_room("sid1", "/", "lobby")
    assert dict(manager.rooms["/"]["lobby"]) == {"sid1": "eio1"}
    manager.basic_leave_room("sid1", "/", "lobby")
    assert "lobby" not in manager.rooms["/"]


def test_the_managers_disconnect_leaves_what_the_library_would() -> None:
    # FleetManager.basic_disconnect replaces the library's scan of every room; whatever state the
    # library keeps per socket must be what ours clears.
    import socketio

    from webapp.realtime.manager import FleetManager

    def used(manager: socketio.AsyncManager) -> socketio.AsyncManager:
        manager.basic_enter_room("s1", "/", None, eio_sid="e1")
        manager.basic_enter_room("s1", "/", "s1")
        manager.basic_enter_room("s1", "/", "lobby")
        manager.basic_enter_room("s2", "/", None, eio_sid="e2")
        manager.basic_enter_room("s2", "/", "lobby")
        manager.pending_connect["/"] = ["s1"]
        manager.pending_disconnect["/"] = ["s1", "s2"]
        manager._generate_ack_id("s1", lambda: None)
        manager.basic_disconnect("s1", "/")
        return manager

    stock, ours = used(socketio.AsyncManager()), used(FleetManager())
    assert vars(stock).keys() <= vars(ours).keys()
    for name in ("rooms", "pending_connect", "pending_disconnect", "callbacks"):
        assert _plain(getattr(ours, name)) == _plain(getattr(stock, name)), name
    assert ours.get_rooms("s2", "/") == stock.get_rooms("s2", "/") == ["lobby"]


def _plain(value: object) -> object:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}  # type: ignore[attr-defined]
    return value

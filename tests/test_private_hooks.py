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


def test_the_managers_room_table_has_the_layout_the_propagator_reads() -> None:
    # propagator.Propagator._members_here reads `manager.rooms[namespace][room]` (no copy per check).
    import socketio

    manager = socketio.AsyncManager()
    manager.basic_enter_room("sid1", "/", None, eio_sid="eio1")
    manager.basic_enter_room("sid1", "/", "lobby")
    assert dict(manager.rooms["/"]["lobby"]) == {"sid1": "eio1"}
    manager.basic_leave_room("sid1", "/", "lobby")
    assert "lobby" not in manager.rooms["/"]

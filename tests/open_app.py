"""tests.fleet_app with a join policy that grants every room: the scopes' own rooms must be
refused before any policy is asked. Served by tests only: `hypercorn tests.open_app:app`."""

from __future__ import annotations

from tests.fleet_app import app, realtime

realtime.join_policy = lambda user_id, room: True

__all__ = ["app"]

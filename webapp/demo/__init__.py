"""The demo page: log in with a name, open a socket, watch events arrive."""

from __future__ import annotations

from quart import Blueprint, current_app, render_template, request
from quart.blueprints import BlueprintSetupState
from quart_auth import current_user

from ..config import Settings
from ..realtime import EXTENSION
from . import gateways

bp = Blueprint("demo", __name__)


@bp.record_once
def _register_gateways(state: BlueprintSetupState) -> None:
    """The demo's gateways come with its blueprint: an app without the demo has none of them."""
    gateways.register(state.app.extensions[EXTENSION])


def public_rooms(user_id: str | None, room: str) -> bool:
    """The demo's join policy: rooms named `public:<name>` are open to every signed-in user;
    any other room is given by the backend (PUT /api/users/<id>/rooms/<room>)."""
    return user_id is not None and room.startswith("public:") and len(room) > len("public:")


@bp.get("/")
async def index() -> str:
    """Show the login form, or the live page for a logged-in user."""
    settings: Settings = current_app.config["SETTINGS"]
    logged_in = await current_user.is_authenticated
    return await render_template(
        "index.html",
        user_id=current_user.auth_id if logged_in else None,
        instance_id=settings.instance_id,
        bus_kind=current_app.extensions["realtime"].bus.kind,
        demo_login=settings.demo_login,
        error=request.args.get("error", "")[:200],
    )

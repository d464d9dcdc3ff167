"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from quart import Blueprint, Response, current_app, jsonify

from ..realtime import realtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
async def healthz() -> Response:
    """200 while the process serves requests."""
    return jsonify({"status": "ok", "instance": current_app.config["SETTINGS"].instance_id})


@bp.get("/readyz")
async def readyz() -> Response:
    """200 when the bus is connected and subscribed, else 503; details either way."""
    service = realtime()
    ready = service.ready
    response = jsonify(
        {
            "ready": ready,
            "instance": current_app.config["SETTINGS"].instance_id,
            **service.status(),
        }
    )
    response.status_code = 200 if ready else 503
    return response

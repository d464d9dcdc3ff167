"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from quart import Blueprint, Response, current_app, jsonify

from ..api.docs import HealthOut, ReadyOut, documented
from ..metrics import CONTENT_TYPE
from ..realtime import realtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented((200, HealthOut))
async def healthz() -> Response:
    """200 while the process serves requests."""
    return jsonify({"status": "ok", "instance": current_app.config["SETTINGS"].instance_id})


@bp.get("/metrics")
async def metrics() -> Response:
    """This instance's metrics in Prometheus's text format (counters, no secrets, no user ids)."""
    service = realtime()
    return Response(service.metrics.render(), content_type=CONTENT_TYPE)


@bp.get("/readyz")
@documented((200, ReadyOut), also={503: ReadyOut})
async def readyz() -> Response:
    """200 when the bus is connected and subscribed and the instance is not draining, else 503.

    On a Redis Cluster, `bus.unreachable_shards` lists the masters that do not answer.

    Only what a load balancer needs: errors and counters are behind the API key (/api/status)."""
    service = realtime()
    ready = service.ready
    bus: dict[str, object] = {"kind": service.bus.kind, "connected": service.bus.ready}
    if unreachable := service.bus.unreachable_shards:
        # A Redis Cluster shard is down: the instance still serves what lives elsewhere.
        bus["unreachable_shards"] = unreachable
    response = jsonify({"ready": ready, "bus": bus})
    response.status_code = 200 if ready else 503
    return response

"""Prometheus metrics of one instance (`GET /metrics`), read from the services at scrape time.

Counters the services keep anyway are read when Prometheus scrapes, so the hot paths pay
nothing for them; only the two latency histograms are observed as events happen. Labels are
bounded: scopes, outcomes, reasons; never user ids or room names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .realtime import Realtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """This instance's registry: a collector over the realtime service, and two histograms."""

    def __init__(self, realtime: Realtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_RealtimeCollector(realtime))
        # CPU, resident memory and open file descriptors (process_*): what a leak shows first.
        ProcessCollector(registry=self.registry)
        publish = Histogram(
            "webapp_publish_seconds", "Time for the bus to confirm a publish",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        lag = Histogram(
            "webapp_delivery_lag_seconds", "From an envelope's creation to its delivery to local sockets",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        realtime.publisher.observe_publish = publish.observe
        realtime.propagator.observe_lag = lag.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RealtimeCollector(Collector):
    def __init__(self, realtime: Realtime) -> None:
        self._realtime = realtime

    def collect(self) -> Iterator[Metric]:
        realtime = self._realtime
        propagator = realtime.propagator
        status = realtime.status()
        bus: Mapping[str, Any] = status["bus"]
        yield _gauge("webapp_ready", "1 while the instance is ready (the bus is up, not draining)", int(realtime.ready))
        yield _gauge("webapp_sockets", "Sockets held by this instance", status["sockets"])
        yield _gauge("webapp_users", "Users with at least one socket on this instance", status["users"])
        yield _gauge("webapp_recoverable_sockets", "Sockets that opted in to recovery", status["recoverable_sockets"])
        yield _labelled(CounterMetricFamily, "webapp_connects", "Handshakes by outcome", "outcome", realtime.connects)
        yield _labelled(CounterMetricFamily, "webapp_disconnects", "Disconnects by reason", "reason", realtime.disconnects)
        yield _labelled(
            CounterMetricFamily, "webapp_deliveries", "Sockets an event was delivered to, by scope", "scope",
            propagator.deliveries_by_scope,
        )
        yield _labelled(CounterMetricFamily, "webapp_publishes", "Publishes by outcome", "outcome", realtime.publisher.publishes)
        yield _counter("webapp_dropped_messages", "Invalid messages dropped from our channels", status["dropped_invalid"])
        yield _counter("webapp_deduplicated_messages", "Messages delivered once already, dropped", status["deduplicated"])
        yield _counter("webapp_slow_consumers_evicted", "Sockets disconnected for not reading", status["slow_consumers_evicted"])
        yield _counter("webapp_rate_limited_events", "Socket events refused by the rate limit", status["rate_limited"])
        yield _counter("webapp_malformed_packets", "Clients disconnected for malformed packets", status["malformed_packets"])
        yield _gauge("webapp_asyncio_tasks", "Tasks alive in this process's event loop", status["tasks"])
        websocket = status["websocket"]
        yield _counter("webapp_ws_frames_written", "WebSocket messages written as ready frames", websocket["frames"])
        yield _counter("webapp_ws_frame_writes", "Writes that carried them (frames / writes: the batching)", websocket["writes"])
        yield _counter("webapp_ws_frame_writes_at_once", "Of those writes, made on the spot, not by the socket's writer task", websocket["written_at_once"])
        yield _counter("webapp_ws_frames_read", "Client messages read by our frame reader, without wsproto", websocket["frames_read"])
        yield _counter("webapp_ws_reads_handed_to_wsproto", "Connections whose reading went back to wsproto (a control, fragmented, compressed or malformed frame)", websocket["reads_handed_to_wsproto"])
        yield _counter("webapp_ws_cut_off", "WebSocket connections aborted: the peer did not answer the server's close", websocket["cut_off"])
        outbox = status["outbox"]
        yield _gauge("webapp_outbox_depth", "Gateway answers waiting for the bus", outbox.get("waiting", 0))
        yield _counter("webapp_outbox_dropped", "Gateway answers the outbox had to drop", outbox.get("dropped", 0))
        for key, help_text in (
            ("reconnects", "Reconnects of the bus's subscriber"),
            ("replayed", "Messages replayed from the history after a gap"),
            ("gaps", "Gaps past the history's retention"),
            ("overflows", "Times a subscriber's inbox reached INBOX_MAX_MESSAGES or INBOX_MAX_BYTES"),
            ("shed", "Live messages left to the history while an inbox was full"),
            ("epoch_changes", "Times Redis was found to have lost its data"),
            ("moved_channels", "Channels followed to another shard (failover, reshard)"),
        ):
            if isinstance(bus.get(key), int):
                yield _counter(f"webapp_bus_{key}", help_text, bus[key])
        recovery = status.get("recovery")
        if recovery is not None:
            outcomes = {"recovered": recovery["recovered"], **{f"failed_{k}": v for k, v in recovery["failed"].items()}}
            yield _labelled(CounterMetricFamily, "webapp_recoveries", "Recovery attempts by outcome", "outcome", outcomes)
        presence = status["presence"]
        yield _counter("webapp_presence_reaped_instances", "Dead instances whose presence was reaped", presence["reaped_instances"])
        yield _counter("webapp_presence_write_errors", "Presence writes that failed (and were retried)", presence["write_errors"])


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _labelled(
    kind: type[CounterMetricFamily], name: str, help_text: str, label: str, values: Mapping[str, float]
) -> CounterMetricFamily:
    family = kind(name, help_text, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family

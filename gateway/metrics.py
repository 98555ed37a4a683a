"""Every Prometheus metric the gateway exports, defined once against an injected registry.

Naming follows Prometheus conventions: the `sse_gateway_` prefix, base units,
`_total` on counters. Labels have bounded cardinality: `route` (from config),
`reason`/`outcome` (fixed sets in this module); never a topic, a client or an
event id. Hot-path counters are bound to their route once (`RouteMetrics`) and
advanced by N once per event batch, never once per subscriber.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import REGISTRY

# `*_created` series double the exposition for no dashboard use; Prometheus
# detects counter resets by itself.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Why a connection ended; the `outcome` label of connections_closed_total.
OUTCOMES = ("normal", "slow", "gone", "shutdown", "error", "limit", "reload")
# Why an upstream attempt failed; the `reason` label of upstream_failures_total.
UPSTREAM_FAILURES = ("connect", "status", "content_type", "read", "timeout", "eof")
# Why an event was not delivered; the `reason` label of events_dropped_total.
DROP_REASONS = ("oversize", "invalid")
# How a subscriber arriving with a Last-Event-ID was served.
REPLAY_OUTCOMES = ("hit", "catchup")
# Why a request was refused before it became a subscriber.
REJECT_REASONS = (
    "not_found",
    "bad_request",
    "forbidden",
    "method_not_allowed",
    "unavailable",
    "topic_limit",
    "over_capacity",
    "client_limit",
    "rate_limit",
    "malformed",
)


class Metrics:
    """The gateway's metric families. One instance per registry (one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        r = self.registry
        self.subscribers = Gauge(
            "sse_gateway_subscribers", "Subscribers currently connected.", ["route"], registry=r
        )
        self.topics = Gauge(
            "sse_gateway_topics",
            "Topics currently open (one upstream each).",
            ["route"],
            registry=r,
        )
        self.upstreams_connected = Gauge(
            "sse_gateway_upstream_connections",
            "Upstream connections currently established and streaming.",
            ["route"],
            registry=r,
        )
        self.connections_opened = Counter(
            "sse_gateway_connections_opened_total",
            "Downstream streams started.",
            ["route"],
            registry=r,
        )
        self.connections_closed = Counter(
            "sse_gateway_connections_closed_total",
            "Downstream streams ended, by outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.upstream_connects = Counter(
            "sse_gateway_upstream_connects_total",
            "Upstream connection attempts that reached a streaming response.",
            ["route"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "sse_gateway_upstream_failures_total",
            "Upstream attempts or streams that failed, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.events_received = Counter(
            "sse_gateway_events_received_total",
            "Events parsed from upstreams.",
            ["route"],
            registry=r,
        )
        self.events_delivered = Counter(
            "sse_gateway_events_delivered_total",
            "Events written to subscribers (one per event per subscriber).",
            ["route"],
            registry=r,
        )
        self.events_dropped = Counter(
            "sse_gateway_events_dropped_total",
            "Upstream events not delivered, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.heartbeats = Counter(
            "sse_gateway_heartbeats_total",
            "Heartbeat comments written to idle subscribers.",
            ["route"],
            registry=r,
        )
        self.bytes_written = Counter(
            "sse_gateway_bytes_written_total",
            "Stream bytes handed to subscriber sockets (events, heartbeats, preambles).",
            ["route"],
            registry=r,
        )
        self.replays = Counter(
            "sse_gateway_replays_total",
            "Subscribers that arrived with a Last-Event-ID, by how they were served: "
            "hit (from the ring) or catchup (waited for an upstream catch-up).",
            ["route", "outcome"],
            registry=r,
        )
        self.replayed_events = Counter(
            "sse_gateway_replayed_events_total",
            "Events written to resuming subscribers from the ring or a catch-up.",
            ["route"],
            registry=r,
        )
        self.catchup_requests = Counter(
            "sse_gateway_catchup_requests_total",
            "Upstream catch-up requests (one per topic and Last-Event-ID, shared).",
            ["route"],
            registry=r,
        )
        self.gaps = Counter(
            "sse_gateway_gaps_total",
            "Gap events sent: a subscriber's missed events could not be delivered.",
            ["route"],
            registry=r,
        )
        self.requests_rejected = Counter(
            "sse_gateway_requests_rejected_total",
            "Requests refused before streaming, by reason.",
            ["reason"],
            registry=r,
        )

        self._routes: dict[str, RouteMetrics] = {}

    def route(self, name: str) -> RouteMetrics:
        """The route's bound children, created on first use and cached."""
        bound = self._routes.get(name)
        if bound is None:
            bound = self._routes[name] = RouteMetrics(self, name)
        return bound


class RouteMetrics:
    """The children of every per-route family, bound once so the hot path skips label lookups."""

    __slots__ = (
        "bytes_written",
        "catchup_requests",
        "closed",
        "dropped",
        "events_delivered",
        "events_received",
        "gaps",
        "heartbeats",
        "opened",
        "replayed_events",
        "replays",
        "subscribers",
        "topics",
        "upstream_connects",
        "upstream_failures",
        "upstreams_connected",
    )

    def __init__(self, m: Metrics, route: str) -> None:
        self.subscribers = m.subscribers.labels(route)
        self.topics = m.topics.labels(route)
        self.upstreams_connected = m.upstreams_connected.labels(route)
        self.opened = m.connections_opened.labels(route)
        self.closed = {o: m.connections_closed.labels(route, o) for o in OUTCOMES}
        self.upstream_connects = m.upstream_connects.labels(route)
        self.upstream_failures = {
            r: m.upstream_failures.labels(route, r) for r in UPSTREAM_FAILURES
        }
        self.events_received = m.events_received.labels(route)
        self.events_delivered = m.events_delivered.labels(route)
        self.dropped = {r: m.events_dropped.labels(route, r) for r in DROP_REASONS}
        self.heartbeats = m.heartbeats.labels(route)
        self.bytes_written = m.bytes_written.labels(route)
        self.replays = {o: m.replays.labels(route, o) for o in REPLAY_OUTCOMES}
        self.replayed_events = m.replayed_events.labels(route)
        self.catchup_requests = m.catchup_requests.labels(route)
        self.gaps = m.gaps.labels(route)

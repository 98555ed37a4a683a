"""Every Prometheus metric the gateway exports, defined once against an injected registry.

Naming follows Prometheus conventions: the `sse_gateway_` prefix, base units,
`_total` on counters. Labels have bounded cardinality: `route` (from config),
`reason`/`outcome`/`state` (fixed sets in this module); never a topic, a client
or an event id. Every child of a route is created when the route is first
bound, so each series exists (at 0) before its first event and dashboards and
alerts never see "no data" for a healthy route. Hot-path counters are bound to
their route once (`RouteMetrics`) and advanced by N once per event batch, never
once per subscriber.

Multi-process: with `PROMETHEUS_MULTIPROC_DIR` set (one setting, read by
prometheus-client when it is imported), every worker writes its samples there
and `exposition()` sums them; gauges say how (`livesum`: only live workers).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector

# `*_created` series double the exposition for no dashboard use; Prometheus
# detects counter resets by itself.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Why a connection ended; the `outcome` label of connections_closed_total.
OUTCOMES = ("normal", "slow", "gone", "shutdown", "error", "limit", "reload", "auth")
# Why an upstream attempt failed; the `reason` label of upstream_failures_total.
UPSTREAM_FAILURES = ("connect", "status", "content_type", "read", "timeout", "eof")
# What a topic's upstream connection is doing; the `state` label.
UPSTREAM_STATES = ("connecting", "connected", "backoff")
# Why an event was not delivered: unparseable upstream input, or a subscriber
# that was cut off (slow) or gone when it came.
DROP_REASONS = ("oversize", "invalid", "slow")
# How a subscriber arriving with a Last-Event-ID was served.
REPLAY_OUTCOMES = ("hit", "catchup")
# Why a resuming subscriber got a `gap` event; the `reason` label of gaps_total (README,
# "Nothing lost", says what each means).
GAP_REASONS = (
    "not_in_ring",
    "catch_up_limit",
    "catch_up_failed",
    "catch_up_timeout",
    "catch_up_overflow",
    "ring_evicted",
    "upstream_ignored_resume",
    "resume_unconfirmed",
    "upstream_reconnected",
)
# Why a request was refused before it became a subscriber.
REJECT_REASONS = (
    "not_found",
    "bad_request",
    "cors",
    "auth",
    "auth_unavailable",
    "method_not_allowed",
    "unavailable",
    "topic_limit",
    "over_capacity",
    "client_limit",
    "rate_limit",
    "malformed",
    "upstream",
)

# From a page reload (seconds) to a dashboard left open all day.
DURATION_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
# Fan-out of one batch to every subscriber: ~1 µs each, so 100 µs to 1 s covers 100 to 1M.
DELIVERY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# Loop lag: under 1 ms is healthy, 100 ms is users noticing, a second is an outage.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Reconnect waits: from the default first wait (0.5 s, jittered to 0.25-0.5 s) through the
# default ceiling (30 s) to the longest an operator is likely to configure.
BACKOFF_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


def multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class Metrics:
    """The gateway's metric families. One instance per registry (one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = REGISTRY  # has the process collector already
        elif not multiprocess():
            ProcessCollector(registry=registry)  # CPU, memory, open fds
        self.registry = r = registry
        self.subscribers = Gauge(
            "sse_gateway_subscribers",
            "Subscribers currently connected.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.topics = Gauge(
            "sse_gateway_topics",
            "Topics currently open (one upstream each).",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_connections = Gauge(
            "sse_gateway_upstream_connections",
            "Topics' upstream connections by state: connecting, connected, or backoff "
            "(waiting to reconnect).",
            ["route", "state"],
            registry=r,
            multiprocess_mode="livesum",
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
        self.subscription_seconds = Histogram(
            "sse_gateway_subscription_duration_seconds",
            "How long downstream streams lasted.",
            ["route"],
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.upstream_connects = Counter(
            "sse_gateway_upstream_connects_total",
            "Upstream connection attempts that reached a streaming response.",
            ["route"],
            registry=r,
        )
        self.upstream_reconnects = Counter(
            "sse_gateway_upstream_reconnects_total",
            "Upstream connection attempts after the first of a topic.",
            ["route"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "sse_gateway_upstream_failures_total",
            "Upstream attempts or streams that failed, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.upstream_backoff_seconds = Histogram(
            "sse_gateway_upstream_backoff_seconds",
            "Waits before reconnecting a topic's upstream: the jittered backoff, at least the "
            "upstream's retry: but never over reconnect_max_seconds. The sum is time spent "
            "without an upstream.",
            ["route"],
            registry=r,
            buckets=BACKOFF_BUCKETS,
        )
        self.upstream_runner_restarts = Counter(
            "sse_gateway_upstream_runner_restarts_total",
            "Topic upstream runners restarted after they crashed or returned (a bug, contained: "
            "the topic's subscribers stay connected).",
            ["route"],
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
            "Events not delivered, by reason: oversize or invalid upstream events (once each), "
            "slow (once per subscriber that was cut off or gone when it came).",
            ["route", "reason"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "sse_gateway_delivery_seconds",
            "Time from an upstream read to its events being written to the last subscriber.",
            ["route"],
            registry=r,
            buckets=DELIVERY_BUCKETS,
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
            "Gap events sent: a subscriber's missed events could not be delivered, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.requests_rejected = Counter(
            "sse_gateway_requests_rejected_total",
            "Requests refused before streaming, by reason.",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "sse_gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer: the time every callback waits.",
            registry=r,
            buckets=LAG_BUCKETS,
        )
        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason)
        self._routes: dict[str, RouteMetrics] = {}

    def route(self, name: str) -> RouteMetrics:
        """The route's bound children, created on first use and cached."""
        bound = self._routes.get(name)
        if bound is None:
            bound = self._routes[name] = RouteMetrics(self, name)
        return bound

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type; the sum over workers in multi-process."""
        registry = self.registry
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST


class RouteMetrics:
    """The children of every per-route family, bound once so the hot path skips label lookups."""

    __slots__ = (
        "bytes_written",
        "catchup_requests",
        "closed",
        "delivery_seconds",
        "dropped",
        "events_delivered",
        "events_received",
        "gaps",
        "heartbeats",
        "opened",
        "replayed_events",
        "replays",
        "subscribers",
        "subscription_seconds",
        "topics",
        "upstream_backoff_seconds",
        "upstream_connects",
        "upstream_failures",
        "upstream_reconnects",
        "upstream_runner_restarts",
        "upstream_states",
    )

    def __init__(self, m: Metrics, route: str) -> None:
        self.subscribers = m.subscribers.labels(route)
        self.topics = m.topics.labels(route)
        self.upstream_states = {s: m.upstream_connections.labels(route, s) for s in UPSTREAM_STATES}
        self.opened = m.connections_opened.labels(route)
        self.closed = {o: m.connections_closed.labels(route, o) for o in OUTCOMES}
        self.subscription_seconds = m.subscription_seconds.labels(route)
        self.upstream_connects = m.upstream_connects.labels(route)
        self.upstream_reconnects = m.upstream_reconnects.labels(route)
        self.upstream_backoff_seconds = m.upstream_backoff_seconds.labels(route)
        self.upstream_runner_restarts = m.upstream_runner_restarts.labels(route)
        self.upstream_failures = {
            r: m.upstream_failures.labels(route, r) for r in UPSTREAM_FAILURES
        }
        self.events_received = m.events_received.labels(route)
        self.events_delivered = m.events_delivered.labels(route)
        self.dropped = {r: m.events_dropped.labels(route, r) for r in DROP_REASONS}
        self.delivery_seconds = m.delivery_seconds.labels(route)
        self.heartbeats = m.heartbeats.labels(route)
        self.bytes_written = m.bytes_written.labels(route)
        self.replays = {o: m.replays.labels(route, o) for o in REPLAY_OUTCOMES}
        self.replayed_events = m.replayed_events.labels(route)
        self.catchup_requests = m.catchup_requests.labels(route)
        self.gaps = {r: m.gaps.labels(route, r) for r in GAP_REASONS}

"""Traffic through a real gateway, and the exact change it makes to each metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from .conftest import GatewayFactory, route_doc
from .support import LogWatcher, Upstream, connect, events, raw_request
from .test_downstream import _stalled_reader


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def each() -> Iterator[tuple[tuple[str, tuple[tuple[str, str], ...]], float]]:
        for family in registry.collect():
            for s in family.samples:
                if s.name.startswith("sse_gateway_"):
                    yield (s.name, tuple(sorted(s.labels.items()))), s.value

    return dict(each())


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def test_traffic_changes_each_metric_by_exactly_what_happened(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    slow_route = route_doc(upstream, name="s", path="/slow/{topic}", max_unsent_bytes=16 * 1024)
    gw = await make_gateway(route_doc(upstream, reconnect_initial_seconds=0.01), slow_route)
    before = samples(gw.registry)

    with LogWatcher("gateway") as log:
        # Three subscribers, two events.
        clients = [await connect(session, gw.url("/events/t")) for _ in range(3)]
        await upstream.wait_open("t")
        await upstream.publish("t", *events("t", 1, 2))
        for client in clients:
            await client.wait_events(2)
        # One leaves.
        clients[0].close()
        await log.until(lambda lines: any("outcome=gone" in line for line in lines))
        # The upstream restarts; one more event reaches the two that stayed.
        await upstream.stop()
        await upstream.start()
        await upstream.wait_open("t")
        await upstream.publish("t", *events("t", 3, 1))
        for client in clients[1:]:
            await client.wait_events(3)
        # Two refused requests.
        assert (await raw_request(gw.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")).split()[
            1
        ] == b"404"
        assert (await raw_request(gw.port, b"GET /events/%2F HTTP/1.1\r\nHost: x\r\n\r\n")).split()[
            1
        ] == b"400"
        # A subscriber that never reads, alone on route s, cut off as slow.
        _, stalled = await _stalled_reader(gw.port, "/slow/flood")
        await upstream.wait_open("flood")
        published = 0
        for i in range(400):
            await upstream.publish("flood", *events("flood", i, 1, size=8 * 1024))
            published += 1
            if any("outcome=slow" in line for line in log.records):
                break
        await log.until(lambda lines: any("outcome=slow" in line for line in lines))
        stalled.close()

    after = samples(gw.registry)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}
    expected = {
        key("sse_gateway_connections_opened_total", route="r"): 3,
        key("sse_gateway_subscribers", route="r"): 2,
        key("sse_gateway_topics", route="r"): 1,
        key("sse_gateway_upstream_connections", route="r", state="connected"): 1,
        key("sse_gateway_upstream_connects_total", route="r"): 2,
        key("sse_gateway_upstream_reconnects_total", route="r"): 1,
        key("sse_gateway_upstream_failures_total", route="r", reason="read"): 1,
        key("sse_gateway_upstream_backoff_seconds_count", route="r"): 1,
        key("sse_gateway_events_received_total", route="r"): 3,
        key("sse_gateway_events_delivered_total", route="r"): 2 * 3 + 1 * 2,
        key("sse_gateway_connections_closed_total", route="r", outcome="gone"): 1,
        key("sse_gateway_subscription_duration_seconds_count", route="r"): 1,
        key("sse_gateway_requests_rejected_total", reason="not_found"): 1,
        key("sse_gateway_requests_rejected_total", reason="bad_request"): 1,
        key("sse_gateway_connections_opened_total", route="s"): 1,
        key("sse_gateway_connections_closed_total", route="s", outcome="slow"): 1,
        key("sse_gateway_subscription_duration_seconds_count", route="s"): 1,
        key("sse_gateway_topics", route="s"): 1,
        key("sse_gateway_upstream_connections", route="s", state="connected"): 1,
        key("sse_gateway_upstream_connects_total", route="s"): 1,
        key("sse_gateway_events_received_total", route="s"): published,
    }
    for k, value in expected.items():
        assert delta[k] == value, (k, delta[k], value)
    # On route s each event either reached the stalled subscriber or was dropped for it while
    # it was a member (the one that found it over its limit at least); events published after
    # its handler finished reached nobody and count as neither.
    s_delivered = delta[key("sse_gateway_events_delivered_total", route="s")]
    s_dropped = delta[key("sse_gateway_events_dropped_total", route="s", reason="slow")]
    assert s_dropped >= 1
    assert s_delivered + s_dropped <= published
    # Nothing else moved, apart from byte counts and timing histograms, whose values
    # depend on the machine (each asserted to have moved where it must).
    timing = ("_bucket", "_sum", "_count")
    moved = {k for k, v in delta.items() if v and k not in expected}
    allowed = {
        k
        for k in moved
        if k[0].startswith(("sse_gateway_bytes_written_total", "sse_gateway_event_loop_lag"))
        or (
            k[0].startswith(
                (
                    "sse_gateway_delivery_seconds",
                    "sse_gateway_subscription_duration",
                    "sse_gateway_upstream_backoff_seconds",
                )
            )
            and k[0].endswith(timing)
        )
        or k[0] in ("sse_gateway_events_delivered_total", "sse_gateway_events_dropped_total")
    }
    assert moved - allowed == set()
    # Two upstream reads carried events: the batch of two, and the one after the restart.
    assert delta[key("sse_gateway_delivery_seconds_count", route="r")] == 2
    assert delta[key("sse_gateway_bytes_written_total", route="r")] > 0
    for client in clients[1:]:
        client.close()


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_access_log_lines_carry_the_fields(
    fmt: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    # No upstream resume: the unknown id gets its gap at once and the client is live before
    # the events are published (a catch-up in flight would hold it back until its timeout).
    gw = await make_gateway(
        route_doc(upstream, heartbeat_seconds=0, upstream_resume=False),
        server={"access_log": fmt},
    )
    with LogWatcher("gateway.access") as log:
        client = await connect(session, gw.url("/events/a?lastEventId=zz&token=s3cret"))
        await upstream.wait_open("a")
        await upstream.publish("a", *events("a", 1, 2))
        await client.wait_events(2)
        client.close()
        await raw_request(gw.port, b"GET /events/a%2Fb?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        await log.until(lambda lines: len(lines) >= 2)
    stream_line = next(line for line in log.records if "stream" in line)
    rejected_line = next(line for line in log.records if "rejected" in line)
    if fmt == "json":
        stream = json.loads(stream_line)
        assert stream["kind"] == "stream"
        assert stream["route"] == "r"
        assert stream["topic"] == upstream.url("/stream/a")
        assert stream["client"] == "127.0.0.1"
        assert stream["status"] == 200
        assert stream["seconds"] >= 0
        assert stream["outcome"] == "gone"
        # The gap notice for "zz" and the two live events; bytes include the preamble.
        assert stream["events"] == 3
        assert stream["bytes"] >= len(b"retry: 3000\n\n") + 2 * len(b"id: 1\ndata: a 1 \n\n")
        rejected = json.loads(rejected_line)
        assert rejected == {
            "kind": "rejected",
            "method": "GET",
            "path": "/events/a%2Fb",
            "client": "127.0.0.1",
            "status": 400,
            "reason": "bad_request",
            "message": "path parameter 'topic' has an invalid value",
        }
    else:
        assert stream_line.startswith("stream route=r topic=http://127.0.0.1:")
        assert "client=127.0.0.1 status=200" in stream_line
        assert "outcome=gone" in stream_line
        assert rejected_line.startswith("rejected method=GET path=")
        assert "reason=bad_request" in rejected_line
    assert "\n" not in stream_line
    assert "\n" not in rejected_line
    assert not any("s3cret" in line for line in log.records)  # no query strings, no tokens


@pytest.mark.process
def test_multiprocess_mode_sums_the_workers(tmp_path: Path) -> None:
    """One setting (PROMETHEUS_MULTIPROC_DIR) and /metrics reports the sum over workers."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from gateway.metrics import Metrics\n"
        "from prometheus_client import CollectorRegistry\n"
        "m = Metrics(CollectorRegistry()).route('r')\n"
        "m.opened.inc(int(__import__('sys').argv[1]))\n"
    )
    for count in ("3", "4"):  # two workers, each counting its own streams
        subprocess.run([sys.executable, "-c", worker, count], env=env, check=True, timeout=30)
    reader = (
        "from gateway.metrics import Metrics\n"
        "from prometheus_client import CollectorRegistry\n"
        "print(Metrics(CollectorRegistry()).exposition()[0].decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", reader],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout
    assert 'sse_gateway_connections_opened_total{route="r"} 7.0' in out

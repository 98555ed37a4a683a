"""Topic lifecycle and upstream resilience over real sockets."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.sse import Event

from .conftest import GatewayFactory, route_doc
from .support import LogWatcher, Upstream, connect, events


async def test_last_subscriber_leaving_closes_upstream_after_linger_and_new_one_reopens(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0.1))
    first = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    first.close()
    await upstream.wait_closed("t")
    assert gw.metric("sse_gateway_topics", route="r") == 0
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="gone") == 1

    second = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    assert len(upstream.connections) == 2
    await upstream.publish("t", *events("t", 1, 1))
    assert await second.wait_events(1) == events("t", 1, 1)
    second.close()


async def test_upstream_restart_resumes_with_last_event_id_and_loses_nothing(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, reconnect_initial_seconds=0.05))
    clients = [await connect(session, gw.url("/events/live")) for _ in range(3)]
    await upstream.wait_open("live")
    await upstream.publish("live", *events("live", 1, 5))
    await asyncio.gather(*(c.wait_events(5) for c in clients))

    await upstream.stop()
    # Published while the gateway is cut off: it must fetch these on resume.
    upstream.history["live"].extend(events("live", 6, 3))
    await upstream.start()
    await upstream.wait_open("live")
    await upstream.publish("live", *events("live", 9, 2))
    await asyncio.gather(*(c.wait_events(10) for c in clients))

    assert upstream.connections[1].headers["Last-Event-ID"] == "5"
    for client in clients:
        assert client.events == events("live", 1, 10)
    assert gw.metric("sse_gateway_upstream_connects_total", route="r") == 2
    assert gw.metric("sse_gateway_upstream_failures_total", route="r", reason="read") == 1
    for client in clients:
        client.close()


async def test_failing_upstream_is_retried_and_reported_and_other_topics_are_undisturbed(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    broken = Upstream()
    await broken.start()
    broken.status = 502
    try:
        gw = await make_gateway(
            route_doc(upstream),
            {
                "name": "b",
                "path": "/broken/{topic}",
                "upstream": broken.url(),
                "reconnect_initial_seconds": 0.01,
                "reconnect_max_seconds": 0.02,
            },
        )
        healthy = await connect(session, gw.url("/events/ok"))
        victim = await connect(session, gw.url("/broken/x"))
        await broken.wait_connections(3)  # retried, with backoff, more than once
        assert gw.metric("sse_gateway_upstream_failures_total", route="b", reason="status") >= 2

        # (A wrong content type is no longer retried: it is final, like a 4xx; see
        # tests/test_passthrough.py.)
        await upstream.wait_open("ok")
        await upstream.publish("ok", *events("ok", 1, 3))
        assert await healthy.wait_events(3) == events("ok", 1, 3)

        broken.status = 200
        await broken.wait_open("x")
        await broken.publish("x", *events("x", 1, 1))
        assert await victim.wait_events(1) == events("x", 1, 1)
        assert gw.metric("sse_gateway_upstream_connections", route="b", state="connected") == 1
        healthy.close()
        victim.close()
    finally:
        await broken.stop()


async def test_refused_connection_is_retried_until_the_upstream_appears(
    make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    late = Upstream()
    await late.start()
    await late.stop()  # keep the port, nothing listens on it now
    gw = await make_gateway(
        route_doc(late, reconnect_initial_seconds=0.01, reconnect_max_seconds=0.05)
    )
    with LogWatcher("gateway.upstream.client") as log:
        client = await connect(session, gw.url("/events/x"))
        await log.until(lambda records: sum("ClientConnectorError" in r for r in records) >= 2)
    assert gw.metric("sse_gateway_upstream_failures_total", route="r", reason="connect") >= 2
    await late.start()
    try:
        await late.wait_open("x")
        await late.publish("x", *events("x", 1, 1))
        assert await client.wait_events(1) == events("x", 1, 1)
    finally:
        client.close()
        await late.stop()


async def test_oversize_upstream_event_is_dropped_counted_and_the_stream_goes_on(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, max_event_bytes=1000, max_line_bytes=500))
    client = await connect(session, gw.url("/events/big"))
    await upstream.wait_open("big")
    await upstream.send("big", b"id: 1\ndata: " + b"x" * 5000 + b"\n\n")
    await upstream.send("big", b"id: 2\n" + b"data: yyyyyyyyyy\n" * 200 + b"\n")
    await upstream.publish("big", *events("big", 3, 1))
    # Dropped, but their ids still move the client's Last-Event-ID, as they would directly.
    assert await client.wait_events(3) == [
        Event("", id="1", dispatch=False),
        Event("", id="2", dispatch=False),
        *events("big", 3, 1),
    ]
    assert gw.metric("sse_gateway_events_dropped_total", route="r", reason="oversize") == 2
    client.close()


async def test_upstream_cut_mid_event_resumes_before_that_event_and_delivers_it_once(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, reconnect_initial_seconds=0.01))
    client = await connect(session, gw.url("/events/cut"))
    await upstream.wait_open("cut")
    await upstream.publish("cut", *events("cut", 1, 4))
    await client.wait_events(4)
    # Event 5 starts, then the connection dies before its blank line.
    await upstream.send("cut", b"id: 5\ndata: cut 5 \n")
    upstream.history["cut"].extend(events("cut", 5, 2))
    await upstream.stop()
    await upstream.start()
    await upstream.wait_open("cut")
    await client.wait_events(6)
    assert upstream.connections[1].headers["Last-Event-ID"] == "4"
    assert client.events == events("cut", 1, 6)
    client.close()


async def test_an_id_that_cannot_be_a_header_does_not_take_the_topic_down(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, reconnect_initial_seconds=0.01))
    client = await connect(session, gw.url("/events/ctl"))
    await upstream.wait_open("ctl")
    await upstream.send("ctl", b"id: a\x01b\ndata: odd\n\n")
    await client.wait_events(1)
    with LogWatcher("gateway.upstream.client") as log:
        await upstream.stop()
        await upstream.start()
        await upstream.wait_open("ctl")
        await log.until(lambda records: any("cannot be sent as a header" in r for r in records))
    assert "Last-Event-ID" not in upstream.connections[1].headers
    await upstream.publish("ctl", *events("ctl", 1, 1))
    await client.wait_events(2)
    assert not client.ended
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="error") == 0
    client.close()


async def test_topic_cap_refuses_new_topics_with_503_but_serves_open_ones(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, max_topics=2))
    a = await connect(session, gw.url("/events/a"))
    b = await connect(session, gw.url("/events/b"))
    async with session.get(gw.url("/events/c")) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
    assert gw.metric("sse_gateway_requests_rejected_total", reason="topic_limit") == 1
    again = await connect(session, gw.url("/events/a"))  # an open topic still takes subscribers
    await upstream.publish("a", *events("a", 1, 1))
    assert await again.wait_events(1) == events("a", 1, 1)
    assert sorted(r.match_info["topic"] for r in upstream.connections) == ["a", "b"]
    for client in (a, b, again):
        client.close()


async def test_gauges_return_to_zero_when_clients_leave(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    clients = [await connect(session, gw.url(f"/events/g{i % 2}")) for i in range(6)]
    await upstream.wait_open("g0")
    await upstream.wait_open("g1")
    assert gw.metric("sse_gateway_subscribers", route="r") == 6
    for client in clients:
        client.close()
    await upstream.wait_closed("g0")
    await upstream.wait_closed("g1")
    assert gw.metric("sse_gateway_subscribers", route="r") == 0
    assert gw.metric("sse_gateway_topics", route="r") == 0
    for state in ("connecting", "connected", "backoff"):
        assert gw.metric("sse_gateway_upstream_connections", route="r", state=state) == 0

"""Shared mode over real sockets: one upstream per topic, every event to every subscriber once."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import GatewayFactory, route_doc
from .support import Upstream, connect, events


async def test_200_subscribers_share_one_upstream_and_get_every_event_in_order(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    clients = await asyncio.gather(*(connect(session, gw.url("/events/news")) for _ in range(200)))
    await upstream.wait_open("news")
    assert len(gw.hub.topics["r " + upstream.url("/stream/news")].subscribers) == 200

    sent = events("news", 1, 50)
    for i in range(0, 50, 5):  # several reads, some holding several events
        await upstream.publish("news", *sent[i : i + 5])
    await asyncio.gather(*(c.wait_events(50) for c in clients))

    assert len(upstream.connections) == 1
    for client in clients:
        assert client.events == sent
    assert gw.metric("sse_gateway_events_received_total", route="r") == 50
    assert gw.metric("sse_gateway_events_delivered_total", route="r") == 50 * 200
    for client in clients:
        client.close()


async def test_100_simultaneous_first_subscribers_open_exactly_one_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    clients = await asyncio.gather(*(connect(session, gw.url("/events/burst")) for _ in range(100)))
    await upstream.wait_open("burst")
    await upstream.publish("burst", *events("burst", 1, 1))
    await asyncio.gather(*(c.wait_events(1) for c in clients))
    assert len(upstream.connections) == 1
    assert gw.metric("sse_gateway_topics", route="r") == 1
    assert gw.metric("sse_gateway_subscribers", route="r") == 100
    for client in clients:
        client.close()


async def test_topics_are_separate_upstreams(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    a = await connect(session, gw.url("/events/a"))
    b = await connect(session, gw.url("/events/b"))
    await upstream.wait_open("a")
    await upstream.wait_open("b")
    await upstream.publish("a", *events("a", 1, 2))
    await upstream.publish("b", *events("b", 1, 3))
    assert await a.wait_events(2) == events("a", 1, 2)
    assert await b.wait_events(3) == events("b", 1, 3)
    assert sorted(r.match_info["topic"] for r in upstream.connections) == ["a", "b"]
    a.close()
    b.close()


async def test_response_headers_and_preamble_are_flushed_before_any_event(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, retry_ms=2500, retry_max_ms=2500))
    client = await connect(session, gw.url("/events/h"))
    headers = client.response.headers
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache, no-transform"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in headers
    assert "Content-Encoding" not in headers
    # No event was published: the preamble alone must already have arrived.
    await client.wait_for(lambda c: bytes(c.raw) == b": ok\nretry: 2500\n\n")
    assert client.parser.retry_ms == 2500
    client.close()


async def test_no_compression_even_when_the_client_asks(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    client = await connect(session, gw.url("/events/z"), headers={"Accept-Encoding": "gzip, br"})
    await upstream.wait_open("z")
    await upstream.publish("z", *events("z", 1, 1, size=2000))
    await client.wait_events(1)
    assert "Content-Encoding" not in client.response.headers
    client.close()


async def test_upstream_request_headers(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, upstream_headers={"X-Service": "gateway"}))
    client = await connect(session, gw.url("/events/hdr"))
    await upstream.wait_connections(1)
    headers = upstream.connections[0].headers
    assert headers["Accept"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["X-Service"] == "gateway"
    assert "Last-Event-ID" not in headers
    client.close()

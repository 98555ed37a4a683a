"""What reaches the client: the upstream's answer, in both modes (issue 12; README, "What
reaches the browser").

A browser's EventSource stops for good on any status but 200 or any type but
text/event-stream, and keeps reconnecting after a network error. Through the gateway a
client must end in the state it would reach talking to the upstream directly, except that
a shared topic hides its upstream's transient failures. Every test here runs over real
sockets: a real aiohttp upstream, the real gateway, a real HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from gateway.config import from_document
from gateway.core.hub import Hub
from gateway.core.route import RouteTable, Target
from gateway.sse import encode_many

from .conftest import Gateway, GatewayFactory, route_doc
from .support import Changes, FakeClock, FakeSubscriber, Upstream, connect, events

MODES = ["shared", "direct"]
FAST = {"reconnect_initial_seconds": 0.01, "reconnect_max_seconds": 0.05}


async def start(
    make_gateway: GatewayFactory, upstream: Upstream, mode: str, **options: Any
) -> Gateway:
    return await make_gateway(route_doc(upstream, mode=mode, **{**FAST, **options}))


async def answer(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    """The response and its whole body; bounded, since a stream that never ends is a failure."""
    async with asyncio.timeout(5), session.get(url, **kwargs) as resp:
        return resp, await resp.read()


async def topics_closed(gw: Gateway, timeout: float = 5) -> None:
    # Polled: the hub has no change notification; the topic closes within a loop turn or two.
    async with asyncio.timeout(timeout):
        while gw.hub.topics:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --- final answers: 204, 4xx, a redirect, a wrong type ----------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("status", "content_type", "passed"),
    [
        (204, "text/event-stream", 204),
        (401, "text/plain", 401),
        (403, "text/plain", 403),
        (404, "text/plain", 404),
        (302, "text/plain", 502),  # a redirect: never followed, so not a stream
        (200, "text/html", 502),  # a wrong type: EventSource would fail it
        (201, "text/event-stream", 201),  # not 200: EventSource fails it, whatever the type
        (206, "text/event-stream", 206),
    ],
)
async def test_a_final_answer_reaches_the_client_and_is_not_retried(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    mode: str,
    status: int,
    content_type: str,
    passed: int,
) -> None:
    upstream.status, upstream.content_type = status, content_type
    gw = await start(make_gateway, upstream, mode)
    resp, body = await answer(session, gw.url("/events/t"))
    assert resp.status == passed
    if passed == 204:
        assert body == b""
    else:
        assert resp.content_type == "text/plain"
        assert body.startswith(b"the upstream ")  # short, and no upstream detail
        assert b"127.0.0.1" not in body
    # The topic ended with its one attempt: nothing retries the upstream.
    await topics_closed(gw)
    assert len(upstream.connections) == 1
    assert gw.metric("sse_gateway_upstream_reconnects_total", route="r") == 0
    assert gw.metric("sse_gateway_requests_rejected_total", reason="upstream") == 1
    # A second request asks the upstream again, and gets its answer again.
    again, _ = await answer(session, gw.url("/events/t"))
    assert again.status == passed
    assert len(upstream.connections) == 2


@pytest.mark.parametrize("mode", MODES)
async def test_a_refusal_carries_the_cors_headers_so_a_cross_origin_browser_stops(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession, mode: str
) -> None:
    # Without them a cross-origin EventSource sees a network error and reconnects.
    upstream.status = 404
    origin = "https://app.example"
    gw = await start(make_gateway, upstream, mode, cors_origins=[origin])
    resp, _ = await answer(session, gw.url("/events/t"), headers={"Origin": origin})
    assert resp.status == 404
    assert resp.headers["Access-Control-Allow-Origin"] == origin


# --- 5xx: passed in direct mode, absorbed in shared mode ---------------------------------


@pytest.mark.parametrize(("status", "passed"), [(500, 502), (502, 502), (503, 503), (504, 504)])
async def test_a_5xx_reaches_a_direct_client_as_502_503_504(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    status: int,
    passed: int,
) -> None:
    upstream.status = status
    gw = await start(make_gateway, upstream, "direct")
    resp, body = await answer(session, gw.url("/events/t"))
    assert resp.status == passed
    assert body == f"the upstream failed ({status})\n".encode()
    await topics_closed(gw)
    assert len(upstream.connections) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_a_5xx_is_absorbed_by_a_shared_topic_which_retries(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    status: int,
) -> None:
    upstream.status = status
    gw = await start(make_gateway, upstream, "shared")
    client = await connect(session, gw.url("/events/t"))  # 200: the stream opens
    await client.wait_for(lambda c: c.raw.endswith(b": ok\nretry: 3000\n\n"))
    await upstream.wait_connections(3)  # retried with backoff
    upstream.status = 200
    await upstream.wait_open("t")
    await upstream.publish("t", *events("t", 1, 2))
    assert await client.wait_events(2) == events("t", 1, 2)
    assert not client.ended
    client.close()


# --- a final answer on a topic that was streaming ----------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [204, 404])
async def test_a_final_answer_on_reconnect_ends_the_stream_and_the_comeback_gets_it(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    mode: str,
    status: int,
) -> None:
    gw = await start(make_gateway, upstream, mode)
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.publish("t", *events("t", 1, 1))
    assert await client.wait_events(1) == events("t", 1, 1)

    # The upstream drops the stream and answers the reconnect with `status`.
    upstream.status = status
    await upstream.stop()
    await upstream.start()
    # Shared: the topic's reconnect got the final answer, so the topic and its subscribers'
    # streams end. Direct: the client's stream ends with its upstream's, as before.
    await client.wait_end()
    assert client.events == events("t", 1, 1)
    if mode == "shared":
        await upstream.wait_connections(2)
        await topics_closed(gw)
        assert gw.metric("sse_gateway_upstream_failures_total", route="r", reason="status") == 1
    # The client comes back (as EventSource would after the end) and gets that answer.
    resp, _ = await answer(session, gw.url("/events/t"))
    assert resp.status == status
    await topics_closed(gw)


# --- no answer: refused, timed out -------------------------------------------------------


async def test_refused_shared_stream_opens_and_the_topic_retries(
    make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    late = Upstream()
    await late.start()
    await late.stop()  # the port is kept; nothing listens on it
    gw = await start(make_gateway, late, "shared")
    client = await connect(session, gw.url("/events/t"))
    await client.wait_for(lambda c: c.raw.endswith(b": ok\nretry: 3000\n\n"))
    await late.start()
    try:
        await late.wait_open("t")
        await late.publish("t", *events("t", 1, 1))
        assert await client.wait_events(1) == events("t", 1, 1)
        assert gw.metric("sse_gateway_upstream_failures_total", route="r", reason="connect") >= 1
    finally:
        client.close()
        await late.stop()


async def test_refused_direct_stream_opens_and_ends_so_the_client_reconnects(
    make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    # As after a network error talking to the upstream directly: EventSource reconnects, on
    # its own schedule (no gateway retry:), rather than stopping for good on a 502.
    late = Upstream()
    await late.start()
    await late.stop()
    gw = await start(make_gateway, late, "direct")
    client = await connect(session, gw.url("/events/t"))
    await client.wait_end()
    assert bytes(client.raw) == b": ok\n\n"
    assert client.events == []
    await topics_closed(gw)


class Silent:
    """An upstream that accepts connections and never answers: stuck before its head."""

    def __init__(self) -> None:
        self.accepted = 0
        self.changes = Changes()
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream/{{topic}}"

    async def __aenter__(self) -> Silent:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        self.changes.notify()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the gateway gives up and closes

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.mark.parametrize("mode", MODES)
async def test_an_upstream_that_never_answers_holds_a_client_no_longer_than_the_timeout(
    make_gateway: GatewayFactory, session: aiohttp.ClientSession, mode: str
) -> None:
    async with Silent() as silent:
        route = {
            "name": "r",
            "path": "/events/{topic}",
            "upstream": silent.url(),
            "mode": mode,
            "retry_ms": 3000,
            "retry_max_ms": 3000,
            "upstream_connect_timeout_seconds": 0.3,
            **FAST,
        }
        gw = await make_gateway(route)
        loop = asyncio.get_running_loop()
        began = loop.time()
        client = await connect(session, gw.url("/events/t"))
        waited = loop.time() - began
        assert 0.25 <= waited < 3
        if mode == "shared":
            # The stream opens (as today) and the topic keeps trying, hidden from the client.
            await client.wait_for(lambda c: c.raw.endswith(b": ok\nretry: 3000\n\n"))
            await silent.changes.until(lambda: silent.accepted >= 2)
            assert not client.ended
            assert len(gw.hub.topics) == 1
            client.close()
        else:
            # No answer: like a network error, the stream ends and the client reconnects.
            await client.wait_end()
            assert bytes(client.raw) == b": ok\n\n"
            await topics_closed(gw)


# --- retry: and heartbeats in direct mode --------------------------------------------------


async def test_direct_mode_forwards_the_upstream_retry_and_adds_none(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await start(make_gateway, upstream, "direct")
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.send("t", b"retry: 1234\n\n")
    await upstream.publish("t", *events("t", 1, 1))
    assert await client.wait_events(1) == events("t", 1, 1)
    assert bytes(client.raw).startswith(b": ok\n\n")  # no gateway retry: in the preamble
    assert b"retry: 3000" not in client.raw
    assert b"retry: 1234\n" in client.raw
    assert client.parser.retry_ms == 1234
    client.close()


async def test_direct_mode_adds_the_gateway_retry_when_the_route_asks(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await start(make_gateway, upstream, "direct", direct_retry=True)
    client = await connect(session, gw.url("/events/t"))
    await client.wait_for(lambda c: c.raw.startswith(b": ok\nretry: 3000\n\n"))
    await upstream.wait_open("t")
    await upstream.send("t", b"retry: 1234\n\n")
    await client.wait_for(lambda c: c.parser.retry_ms == 1234)  # the upstream's still wins
    client.close()


async def test_shared_mode_keeps_the_gateway_retry(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    # A shared stream hides its upstream's reconnects: the upstream's retry: is the topic's.
    gw = await start(make_gateway, upstream, "shared")
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.send("t", b"retry: 1234\n\n")
    await upstream.publish("t", *events("t", 1, 1))
    assert await client.wait_events(1) == events("t", 1, 1)
    assert bytes(client.raw).startswith(b": ok\nretry: 3000\n\n")
    assert b"retry: 1234" not in client.raw
    client.close()


async def test_direct_mode_heartbeats_flow_once_streaming(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await start(make_gateway, upstream, "direct", heartbeat_seconds=0.2)
    client = await connect(session, gw.url("/events/t"))
    await client.wait_for(lambda c: b": heartbeat\n" in c.raw)
    client.close()


# --- the hold: a topic opened for a client that has not joined yet (hub, virtual clock) ----


def one_target(linger: float = 5.0) -> Target:
    route = {"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", "linger_seconds": linger}
    doc = {"routes": [route]}
    return RouteTable(from_document(doc, {}).routes).resolve("/e/a", [])


async def test_a_held_topic_does_not_linger_away_and_a_let_go_one_does(
    hub: Hub, clock: FakeClock
) -> None:
    topic = hub.open(one_target(linger=1.0))
    clock.advance(10)  # waiting for an answer takes as long as it takes
    assert hub.topics == {topic.key: topic}
    hub.let_go(topic)  # the client was refused or left: the topic lingers, then closes
    assert hub.topics == {topic.key: topic}
    clock.advance(1.5)
    assert hub.topics == {}


async def test_a_join_gets_what_the_topic_published_while_the_head_went_out(
    hub: Hub, clock: FakeClock
) -> None:
    topic = hub.open(one_target())
    since = topic.ring.next_seq
    topic.publish(events("a", 1, 2))  # published before the client could join
    sub = FakeSubscriber()
    hub.join(topic, sub, None, since)
    topic.publish(events("a", 3, 1))
    assert b"".join(sub.received) == encode_many(events("a", 1, 3))


async def test_a_join_after_the_topic_ended_hands_over_what_it_published_then_ends(
    hub: Hub, clock: FakeClock
) -> None:
    # A direct topic whose upstream streamed a little and ended before its client joined.
    topic = hub.open(one_target())
    since = topic.ring.next_seq
    topic.publish(events("a", 1, 2))
    hub.close_route_topics(lambda target: False, "normal")
    sub = FakeSubscriber()
    hub.join(topic, sub, None, since)
    assert b"".join(sub.received) == encode_many(events("a", 1, 2))
    assert sub.outcome == "normal"
    assert not topic.subscribers


@pytest.mark.parametrize(("mode", "status"), [("direct", 429), ("shared", 429), ("direct", 503)])
async def test_the_upstreams_retry_after_comes_with_its_429_or_503(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    mode: str,
    status: int,
) -> None:
    upstream.status, upstream.content_type = status, "text/plain"
    upstream.refusal_headers = {"Retry-After": "7"}
    gw = await start(make_gateway, upstream, mode)
    resp, _ = await answer(session, gw.url("/events/t"))
    assert resp.status == status
    assert resp.headers.get("Retry-After") == "7"
    upstream.refusal_headers = {"Retry-After": "soon\u00e9"}  # not a Retry-After: dropped
    resp, _ = await answer(session, gw.url("/events/t2"))
    assert resp.status == status
    assert "Retry-After" not in resp.headers

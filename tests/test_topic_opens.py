"""One client cannot fill a route: topic opens per address are rate-limited and capped."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import HUB, make_app, make_runner
from gateway.config import GatewayConfig, from_document
from gateway.core.hub import Hub
from gateway.core.route import RouteTable, Target
from gateway.errors import ClientLimit, GatewayError, RateLimited, TopicLimit
from gateway.metrics import Metrics

from .conftest import GatewayFactory, route_doc
from .support import (
    FakeClock,
    FakeSubscriber,
    ScriptedUpstreams,
    Upstream,
    events,
    request_status,
    start_runner,
)


def setup(
    upstreams: ScriptedUpstreams,
    clock: FakeClock,
    metrics: Metrics,
    rate: float = 5.0,
    share: float = 0.5,
    **route: Any,
) -> tuple[Hub, RouteTable]:
    doc = {
        "routes": [{"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", **route}],
        "limits": {"topic_opens_per_client_per_second": rate, "max_topic_share_per_client": share},
    }
    config: GatewayConfig = from_document(doc, {})
    return Hub(upstreams, clock, metrics, config.limits), RouteTable(config.routes)


def target(table: RouteTable, name: str) -> Target:
    return table.resolve(f"/e/{name}", [])


async def test_one_address_cycling_topic_names_gets_a_few_opens_a_second_and_others_get_in(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    # The attack: a new topic name every 5 ms for 60 s, each left at once (so each
    # lingers 5 s holding an upstream), against max_topics = 1000.
    hub, table = setup(upstreams, clock, metrics, max_topics=1000, linger_seconds=5.0)
    opened_at: list[float] = []
    refused: dict[type[GatewayError], int] = {}
    for i in range(12_000):
        t = target(table, f"junk{i}")
        sub = FakeSubscriber()
        try:
            topic = hub.subscribe(t, sub, client="10.0.0.66")
        except GatewayError as exc:
            refused[type(exc)] = refused.get(type(exc), 0) + 1
        else:
            opened_at.append(clock.now())
            hub.unsubscribe(topic, sub)
        clock.advance(0.005)
        assert len(hub.topics) <= 500  # never past half the route
    # A burst of 2 s' worth (10), then 5 a second.
    assert len(opened_at) <= 10 + 5 * 60 + 1
    assert max(sum(1 for t in opened_at if s <= t < s + 1) for s in opened_at) <= 10 + 5
    start = opened_at[0]
    assert sum(1 for t in opened_at if t >= start + 10) <= 5 * 50 + 1  # then 5 a second
    assert set(refused) == {RateLimited}
    # Everybody else still opens topics.
    others = [hub.subscribe(target(table, f"x{i}"), FakeSubscriber(), client=f"10.1.0.{i}")]
    others += [hub.subscribe(target(table, f"y{i}"), FakeSubscriber()) for i in range(3)]
    assert all(t.key in hub.topics for t in others)


async def test_with_no_open_rate_the_cap_alone_keeps_half_the_route_for_others(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    # The numbers: max_topics 16 and one address cycling names faster than the linger.
    hub, table = setup(upstreams, clock, metrics, rate=0, max_topics=16, linger_seconds=5.0)
    refused: dict[type[GatewayError], int] = {}
    for i in range(600):  # 3 s at one name every 5 ms
        sub = FakeSubscriber()
        try:
            topic = hub.subscribe(target(table, f"junk{i}"), sub, client="10.0.0.66")
        except GatewayError as exc:
            refused[type(exc)] = refused.get(type(exc), 0) + 1
        else:
            hub.unsubscribe(topic, sub)
        clock.advance(0.005)
    assert len(hub.topics) == 8
    assert set(refused) == {ClientLimit}
    for i in range(8):  # 16 tries by others: none refused
        hub.subscribe(target(table, f"other{i}"), FakeSubscriber(), client=f"10.1.0.{i}")
        hub.subscribe(target(table, f"other{i}"), FakeSubscriber(), client=f"10.2.0.{i}")
    assert len(hub.topics) == 16


async def test_topics_nobody_else_joined_are_capped_at_half_the_route(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    hub, table = setup(upstreams, clock, metrics, rate=0, max_topics=7, linger_seconds=5.0)
    mine = [hub.subscribe(target(table, f"a{i}"), FakeSubscriber(), client="A") for i in range(4)]
    with pytest.raises(ClientLimit) as refused:
        hub.admit(target(table, "a4"), client="A")
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "5"
    with pytest.raises(ClientLimit):
        hub.subscribe(target(table, "a4"), FakeSubscriber(), client="A")
    # Joining an open topic is never limited, and B still has room.
    hub.subscribe(mine[0].target, FakeSubscriber(), client="A")
    theirs = [hub.subscribe(target(table, f"b{i}"), FakeSubscriber(), client="B") for i in range(2)]
    hub.subscribe(theirs[0].target, FakeSubscriber(), client="A")
    # B wants one of A's topics too: it is no longer only A's, so A may open another.
    hub.subscribe(mine[1].target, FakeSubscriber(), client="B")
    hub.subscribe(target(table, "a4"), FakeSubscriber(), client="A")
    with pytest.raises(TopicLimit):  # now the route itself is full: 503, as before
        hub.subscribe(target(table, "b2"), FakeSubscriber(), client="B")


async def test_a_closed_topic_no_longer_counts_and_the_bookkeeping_empties(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    hub, table = setup(upstreams, clock, metrics, rate=0, max_topics=4, linger_seconds=5.0)
    subs = [FakeSubscriber() for _ in range(2)]
    topics = [hub.subscribe(target(table, f"a{i}"), s, client="A") for i, s in enumerate(subs)]
    with pytest.raises(ClientLimit):
        hub.subscribe(target(table, "a2"), FakeSubscriber(), client="A")
    for topic, sub in zip(topics, subs, strict=True):
        hub.unsubscribe(topic, sub)
    clock.advance(4.0)
    with pytest.raises(ClientLimit):  # lingering topics still hold upstreams: still counted
        hub.subscribe(target(table, "a2"), FakeSubscriber(), client="A")
    clock.advance(1.0)  # the linger ends: both close
    assert hub.topics == {}
    assert hub._solo == {}
    assert hub._opened_by == {}
    last = FakeSubscriber()
    topic = hub.subscribe(target(table, "a2"), last, client="A")
    await hub.close()
    assert topic.key not in hub.topics
    assert hub._solo == {}
    assert hub._opened_by == {}


async def test_admit_checks_without_spending_and_the_bucket_refills(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    hub, table = setup(upstreams, clock, metrics, rate=1.0)  # a burst of 2
    for _ in range(10):
        hub.admit(target(table, "a"), client="A")
    hub.subscribe(target(table, "a"), FakeSubscriber(), client="A")
    hub.subscribe(target(table, "b"), FakeSubscriber(), client="A")
    with pytest.raises(RateLimited) as refused:
        hub.admit(target(table, "c"), client="A")
    assert refused.value.headers["Retry-After"] == "1"
    hub.subscribe(target(table, "c"), FakeSubscriber(), client="B")  # B has its own bucket
    hub.subscribe(target(table, "a"), FakeSubscriber(), client="A")  # joining costs nothing
    clock.advance(1.0)
    hub.subscribe(target(table, "d"), FakeSubscriber(), client="A")


async def test_the_open_rate_table_stays_bounded_over_many_addresses(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    hub, table = setup(upstreams, clock, metrics, linger_seconds=0.0)
    for i in range(5000):
        sub = FakeSubscriber()
        topic = hub.subscribe(target(table, f"t{i}"), sub, client=f"10.0.{i // 256}.{i % 256}")
        hub.unsubscribe(topic, sub)
        clock.advance(0.01)
    assert len(hub._open_tat) <= 1024
    assert hub._solo == {}
    assert hub._opened_by == {}


async def test_direct_routes_and_unknown_clients_are_not_limited_per_client(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    # A direct topic is one client's own stream: max_subscribers_per_client bounds those.
    hub, table = setup(upstreams, clock, metrics, rate=1.0, max_topics=4, mode="direct")
    for i in range(4):
        hub.subscribe(target(table, f"a{i}"), FakeSubscriber(), client="A")
    assert len(hub.topics) == 4
    shared, shared_table = setup(upstreams, clock, metrics, rate=1.0, max_topics=4)
    for i in range(4):
        shared.subscribe(target(shared_table, f"n{i}"), FakeSubscriber())  # no client given
    assert len(shared.topics) == 4


# Bounds of the attack over real sockets: whichever comes first.
CYCLE_REQUESTS = 400
CYCLE_SECONDS = 4.0


async def _open_and_leave(port: int, path: str, local: str = "127.0.0.1") -> bytes:
    """Start a stream on its own connection from `local`, read its status, and leave."""
    return await request_status(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), local)


async def test_one_address_cycling_topic_names_over_real_sockets_is_bounded(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    # The done-when, through a real gateway: one address cycling topic names cannot
    # push the route past half its max_topics nor open more than a few upstreams a second,
    # and another address still gets new topics every time.
    gw = await make_gateway(
        route_doc(upstream, max_topics=16, linger_seconds=60),
        limits={"topic_opens_per_client_per_second": 5, "max_topic_share_per_client": 0.5},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses: dict[bytes, int] = {}
    for i in range(CYCLE_REQUESTS):
        if loop.time() - started > CYCLE_SECONDS:
            break
        status = await _open_and_leave(gw.port, f"/events/junk{i}")
        statuses[status] = statuses.get(status, 0) + 1
    elapsed = loop.time() - started
    opened = len(upstream.connections)
    # A burst of two seconds' worth, then the rate; and never more than half the route.
    assert opened <= min(8, 10 + 5 * elapsed), (opened, elapsed, statuses)
    assert gw.metric("sse_gateway_topics", route="r") <= 8
    assert statuses.get(b"429", 0) > 0, statuses
    others = [await _open_and_leave(gw.port, f"/events/other{i}", "127.0.0.2") for i in range(8)]
    assert others == [b"200"] * 8
    assert gw.metric("sse_gateway_topics", route="r") == opened + 8


async def test_one_address_cycling_topic_names_over_real_sockets_opens_a_few_a_second(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    # A roomy route whose topics close at once: only the open rate stands between one address
    # and an upstream connection per request.
    gw = await make_gateway(
        route_doc(upstream, max_topics=1000, linger_seconds=0),
        limits={"topic_opens_per_client_per_second": 5},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    while sent < CYCLE_REQUESTS and loop.time() - started < CYCLE_SECONDS:
        await _open_and_leave(gw.port, f"/events/junk{sent}")
        sent += 1
    elapsed = loop.time() - started
    assert sent > 40, "the attack was too slow to tell"
    # Two seconds' worth of burst, then five a second.
    assert len(upstream.connections) <= 10 + 5 * elapsed + 1, (len(upstream.connections), sent)
    assert await _open_and_leave(gw.port, "/events/other", "127.0.0.2") == b"200"


async def test_a_share_of_one_lets_one_address_use_the_whole_route(
    upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    # Behind a proxy that is not trusted every client is one address: the operator turns the
    # per-client share off and the route's own cap is what remains.
    hub, table = setup(upstreams, clock, metrics, rate=0, share=1.0, max_topics=4)
    for i in range(4):
        hub.subscribe(target(table, f"t{i}"), FakeSubscriber(), client="10.0.0.1")
    with pytest.raises(TopicLimit):
        hub.admit(target(table, "t4"), client="10.0.0.1")


async def test_a_stream_holds_its_topic_before_its_response_starts(
    upstream: Upstream,
) -> None:
    # The topic is taken (opened and held) before the response head goes out, since its
    # upstream's answer decides the status. So a client opening another topic of the full
    # route while this head goes out is the one refused, with a clean status; this stream,
    # whose 200 has gone out, is never ended for a limit afterwards.
    config = from_document(
        {"routes": [route_doc(upstream, max_topics=1)], "metrics": {"listen": ""}}, {}
    )
    registry = CollectorRegistry()
    app = make_app(config, metrics=Metrics(registry))
    table = RouteTable(config.routes)
    refused: list[GatewayError] = []

    async def someone_else_opens_a_topic(request: web.BaseRequest, resp: Any) -> None:
        if request.path.startswith("/events/"):
            try:
                app[HUB].subscribe(table.resolve("/events/other", []), FakeSubscriber())
            except TopicLimit as exc:
                refused.append(exc)

    app.on_response_prepare.append(someone_else_opens_a_topic)
    runner = make_runner(app)
    port = await start_runner(runner)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events/mine HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            await upstream.wait_open("mine")
            await upstream.publish("mine", *events("mine", 1, 1))
            body = b""
            while b"data: mine 1" not in body:
                chunk = await reader.read(4096)
                assert chunk, body  # the stream goes on: no end before the event
                body += chunk
        writer.close()
        assert head.startswith(b"HTTP/1.1 200")
        assert [type(e) for e in refused] == [TopicLimit]
        labels = {"route": "r", "outcome": "limit"}
        assert not registry.get_sample_value("sse_gateway_connections_closed_total", labels)
    finally:
        await runner.cleanup()

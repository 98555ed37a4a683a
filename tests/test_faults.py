"""The fault matrix: each fault next to a healthy topic, which must not notice it.

Every case asserts three things: the healthy topic keeps delivering (each of its
events arrives before the next is published), the fault is counted in a metric,
and it shows in a log line.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import Gateway, GatewayFactory, route_doc
from .support import Client, LogWatcher, Upstream, connect, events, raw_request, start_runner


class FaultyUpstream:
    """An upstream whose every response is one scripted misbehaviour."""

    def __init__(self, behaviour: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()

        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            return await self.behaviour(request)

        app.router.add_get("/stream/{topic}", handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2)
        self.port = await start_runner(self.runner)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def sse_response(request: web.Request, body: bytes, hold: bool = False) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(body)
    if hold:
        await asyncio.Event().wait()  # a stall: headers and maybe bytes, then nothing
    return resp


async def status_502(request: web.Request) -> web.StreamResponse:
    return web.Response(status=502, text="bad gateway")


async def cut_mid_event(request: web.Request) -> web.StreamResponse:
    resp = await sse_response(request, b"id: 1\ndata: half")
    request.transport.abort()  # type: ignore[union-attr]
    return resp


async def line_too_long(request: web.Request) -> web.StreamResponse:
    return await sse_response(request, b"data: " + b"x" * 4096 + b"\n\n", hold=True)


async def stall(request: web.Request) -> web.StreamResponse:
    return await sse_response(request, b": hello\n\n", hold=True)


async def invalid_utf8(request: web.Request) -> web.StreamResponse:
    return await sse_response(request, b"id: 1\ndata: caf\xc3\n\nid: 2\ndata: ok\n\n", hold=True)


async def huge_retry(request: web.Request) -> web.StreamResponse:
    # Once an OverflowError (10**400 / 1000) that crashed the topic's runner.
    return await sse_response(request, b"retry: %d\n\n" % 10**400)


async def years_retry(request: web.Request) -> web.StreamResponse:
    # 99999999999 ms: three years, which once parked the topic past reconnect_max_seconds.
    return await sse_response(request, b"retry: 99999999999\n\n")


UPSTREAM_FAULTS: dict[str, tuple[Any, dict[str, Any], str, dict[str, str], str]] = {
    # name: (behaviour, route options, metric, labels, log text)
    # (A wrong content type is final, not a fault the topic retries: tests/test_passthrough.py.)
    "refused": (None, {}, "sse_gateway_upstream_failures_total", {"reason": "connect"}, "Connect"),
    "dns": ("dns", {}, "sse_gateway_upstream_failures_total", {"reason": "connect"}, "Connect"),
    "non_2xx": (
        status_502,
        {},
        "sse_gateway_upstream_failures_total",
        {"reason": "status"},
        "HTTP status 502",
    ),
    "cut_mid_event": (
        cut_mid_event,
        {},
        "sse_gateway_upstream_failures_total",
        {"reason": "read"},
        "reconnecting",
    ),
    "line_too_long": (
        line_too_long,
        {"max_line_bytes": 1024},
        "sse_gateway_events_dropped_total",
        {"reason": "oversize"},
        "dropped",
    ),
    "stall": (
        stall,
        {"upstream_idle_timeout_seconds": 0.2},
        "sse_gateway_upstream_failures_total",
        {"reason": "timeout"},
        "idle timeout",
    ),
    # The route's reconnect_max_seconds (0.1) bounds the wait, so a reconnect comes soon.
    "huge_retry": (
        huge_retry,
        {},
        "sse_gateway_upstream_reconnects_total",
        {},
        "upstream closed the stream; backing off",
    ),
    "years_retry": (
        years_retry,
        {},
        "sse_gateway_upstream_reconnects_total",
        {},
        "(its retry: is over reconnect_max_seconds, capped)",
    ),
}


async def keep_healthy_topic_flowing(
    upstream: Upstream, client: Client, until: Callable[[], bool], rounds: int = 400
) -> int:
    """Publish to the healthy topic one event at a time; each must arrive before the next."""
    sent = len(client.events)
    for _ in range(rounds):
        if until():
            return sent
        sent += 1
        await upstream.publish("healthy", *events("healthy", sent, 1))
        await client.wait_events(sent, timeout=2)
        await asyncio.sleep(0.005)  # pacing the healthy topic while the fault plays out
    raise AssertionError("the fault never showed in its metric")


@pytest.mark.parametrize("fault", sorted(UPSTREAM_FAULTS))
async def test_upstream_fault_is_contained_counted_and_logged(
    fault: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    behaviour, options, metric, labels, log_text = UPSTREAM_FAULTS[fault]
    faulty = None
    if behaviour is None:  # nothing listens on the port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/stream/{{topic}}"
    elif behaviour == "dns":
        url = "http://no-such-host.invalid/stream/{topic}"
    else:
        faulty = FaultyUpstream(behaviour)
        await faulty.start()
        url = f"http://127.0.0.1:{faulty.port}/stream/{{topic}}"
    bad_route = {
        "name": "bad",
        "path": "/bad/{topic}",
        "upstream": url,
        "reconnect_initial_seconds": 0.05,
        "reconnect_max_seconds": 0.1,
        **options,
    }
    try:
        with LogWatcher("gateway") as log:
            gw: Gateway = await make_gateway(route_doc(upstream), bad_route)
            healthy = await connect(session, gw.url("/events/healthy"))
            victim = await connect(session, gw.url("/bad/x"))
            await upstream.wait_open("healthy")
            await keep_healthy_topic_flowing(
                upstream, healthy, lambda: gw.metric(metric, route="bad", **labels) >= 1
            )
            if log_text != "dropped":
                await log.until(lambda records: any(log_text in r for r in records))
        assert healthy.events == events("healthy", 1, len(healthy.events))
        assert not victim.ended  # the faulty topic's subscriber is kept, waiting for recovery
        assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="error") == 0
        healthy.close()
        victim.close()
    finally:
        if faulty is not None:
            await faulty.stop()


async def test_invalid_utf8_from_upstream_is_replaced_and_the_stream_goes_on(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    faulty = FaultyUpstream(invalid_utf8)
    await faulty.start()
    try:
        bad = {
            "name": "bad",
            "path": "/bad/{topic}",
            "upstream": f"http://127.0.0.1:{faulty.port}/stream/{{topic}}",
        }
        gw = await make_gateway(route_doc(upstream), bad)
        victim = await connect(session, gw.url("/bad/x"))
        received = await victim.wait_events(2)
        assert [e.data for e in received] == ["caf\ufffd", "ok"]
        assert gw.metric("sse_gateway_events_received_total", route="bad") == 2
        victim.close()
    finally:
        await faulty.stop()


# --- downstream faults --------------------------------------------------------------


async def reset_mid_write(gw: Gateway, upstream: Upstream) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    await loop.sock_sendall(sock, b"GET /events/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    async with asyncio.timeout(5):
        while b"retry: 3000" not in received:  # subscribed once its preamble arrived
            received += await loop.sock_recv(sock, 4096)
    await upstream.publish("healthy", *events("big", 1, 20, size=20_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST while the gateway is writing


async def slowloris(gw: Gateway, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /events/healthy HTTP/1.1\r\nHo")
    await writer.drain()
    # The header timeout (0.3 s in this test) closes it: the read ends without a response.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def garbage(gw: Gateway, upstream: Upstream) -> None:
    head = await raw_request(
        gw.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"
    )
    assert head.split(b" ")[1] == b"400"


async def oversized_header(gw: Gateway, upstream: Upstream) -> None:
    request = b"GET /events/healthy HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    head = await raw_request(gw.port, request)
    assert head.split(b" ")[1] == b"400"


async def control_characters_in_path(gw: Gateway, upstream: Upstream) -> None:
    head = await raw_request(gw.port, b"GET /events/a%07%1B%0Ab HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.split(b" ")[1] == b"400"


async def control_characters_in_last_event_id(gw: Gateway, upstream: Upstream) -> None:
    head = await raw_request(
        gw.port, b"GET /events/healthy?lastEventId=1%0D%0A2 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert head.split(b" ")[1] == b"400"


async def huge_last_event_id(gw: Gateway, upstream: Upstream) -> None:
    request = (
        b"GET /events/healthy HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + b"7" * 2000 + b"\r\n\r\n"
    )
    head = await raw_request(gw.port, request)
    assert head.split(b" ")[1] == b"400"


DOWNSTREAM_FAULTS: dict[
    str, tuple[Callable[[Gateway, Upstream], Awaitable[None]], str, str, str]
] = {
    # name: (fault, metric, labels reason/outcome, log text)
    "reset_mid_write": (
        reset_mid_write,
        "sse_gateway_connections_closed_total",
        "gone",
        "outcome=gone",
    ),
    # aiohttp closes it silently: no log line, no metric (see the issue note).
    "slowloris": (slowloris, "", "", ""),
    "garbage": (garbage, "sse_gateway_requests_rejected_total", "malformed", "reason=malformed"),
    "oversized_header": (
        oversized_header,
        "sse_gateway_requests_rejected_total",
        "malformed",
        "reason=malformed",
    ),
    "control_characters_in_path": (
        control_characters_in_path,
        "sse_gateway_requests_rejected_total",
        "bad_request",
        "rejected method=GET",
    ),
    "control_characters_in_last_event_id": (
        control_characters_in_last_event_id,
        "sse_gateway_requests_rejected_total",
        "bad_request",
        "Last-Event-ID holds a control character",
    ),
    "huge_last_event_id": (
        huge_last_event_id,
        "sse_gateway_requests_rejected_total",
        "bad_request",
        "Last-Event-ID is longer",
    ),
}


@pytest.mark.parametrize("fault", sorted(DOWNSTREAM_FAULTS))
async def test_downstream_fault_never_disturbs_other_subscribers(
    fault: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    action, metric, label, log_text = DOWNSTREAM_FAULTS[fault]
    with LogWatcher("gateway") as log:
        gw = await make_gateway(route_doc(upstream), limits={"header_timeout_seconds": 0.3})
        healthy = await connect(session, gw.url("/events/healthy"))
        await upstream.wait_open("healthy")
        await action(gw, upstream)
        # The healthy subscriber keeps up through and after the fault.
        for i in range(5):
            await upstream.publish("healthy", *events("after", i, 1))
            await healthy.wait_for(
                lambda c, i=i: bool(c.events) and c.events[-1].data == f"after {i} ",  # type: ignore[misc]
                timeout=2,
            )
        if log_text:  # the metric is counted before the line is logged
            await log.until(lambda records: any(log_text in r for r in records))
        if metric:
            labels = {"reason": label} if "rejected" in metric else {"route": "r", "outcome": label}
            assert gw.metric(metric, **labels) == 1
    after = [e.data for e in healthy.events if e.data.startswith("after")]
    assert after == [f"after {i} " for i in range(5)]
    healthy.close()


async def test_over_limit_requests_get_429_or_503_with_retry_after_and_no_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(
        route_doc(upstream, max_subscribers=3),
        limits={"max_subscribers_per_client": 2, "max_subscribers": 100},
    )
    a = await connect(session, gw.url("/events/a"))
    b = await connect(session, gw.url("/events/b"))
    async with session.get(gw.url("/events/c")) as resp:  # this address holds 2 already
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) > 0
    assert gw.metric("sse_gateway_requests_rejected_total", reason="client_limit") == 1
    assert sorted(r.match_info["topic"] for r in upstream.connections) == ["a", "b"]
    a.close()
    b.close()


async def test_rate_and_capacity_limits(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(
        route_doc(upstream, max_subscribers=1),
        limits={"max_connections_per_second": 0.001},  # a burst of one, then nothing for ages
    )
    first = await connect(session, gw.url("/events/a"))
    async with session.get(gw.url("/events/a")) as resp:
        assert resp.status == 503  # the route's subscriber cap comes first
        assert "Retry-After" in resp.headers
    first.close()
    await first.wait_end()
    await upstream.wait_open("a")
    assert gw.metric("sse_gateway_requests_rejected_total", reason="over_capacity") == 1


async def test_token_bucket_refuses_a_burst_over_the_rate(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    # One address may use half the rate (policy.DEFAULT_CLIENT_RATE_SHARE): 2 a second.
    gw = await make_gateway(route_doc(upstream), limits={"max_connections_per_second": 4})
    statuses = []
    clients = []
    for _ in range(5):
        resp = await session.get(gw.url("/events/r"))
        statuses.append(resp.status)
        if resp.status == 200:
            clients.append(resp)
        else:
            assert int(resp.headers["Retry-After"]) >= 1
            resp.close()
    assert statuses.count(200) == 2
    assert statuses.count(429) == 3
    assert gw.metric("sse_gateway_requests_rejected_total", reason="rate_limit") == 3
    for resp in clients:
        resp.close()

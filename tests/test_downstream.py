"""Downstream behaviour over real sockets: slow subscribers, heartbeats, HTTP/1.0, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import ADMISSION, HUB, LIFECYCLE, make_app, make_runner
from gateway.config import from_document
from gateway.metrics import Metrics
from gateway.sse import Parser

from .conftest import GatewayFactory, route_doc
from .support import (
    FakeClock,
    FakeTransport,
    LogWatcher,
    Upstream,
    connect,
    events,
    fake_downstream,
    raw_request,
)

HEARTBEAT = b": heartbeat\n\n"
# The preamble as a chunk: a comment and the retry hint, one block.
PREAMBLE_CHUNK = b"12\r\n: ok\nretry: 3000\n\n\r\n"


async def _stalled_reader(
    port: int, path: str, headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that sends a request, then never reads (a tiny receive buffer fills fast)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_subscriber_that_never_reads_is_cut_off_at_its_limit_while_others_keep_up(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, max_unsent_bytes=64 * 1024))
    good = await connect(session, gw.url("/events/flood"))
    _, stalled = await _stalled_reader(gw.port, "/events/flood")
    await upstream.wait_open("flood")
    await good.wait_for(lambda c: b"retry: 3000\n" in bytes(c.raw))
    sent = 0
    # Bounded: 16 MB at most, far beyond kernel buffers plus the 64 KiB limit.
    for batch in range(500):
        await upstream.publish("flood", *events("flood", batch, 1, size=32 * 1024))
        sent += 1
        # The good client is never held back by the stalled one: it has every event so far.
        await good.wait_events(sent)
        if gw.metric("sse_gateway_connections_closed_total", route="r", outcome="slow") == 1:
            break
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="slow") == 1
    assert gw.metric("sse_gateway_subscribers", route="r") == 1
    await upstream.publish("flood", *events("flood", 1000, 1))
    await good.wait_events(sent + 1)
    assert [e.id for e in good.events] == [str(i) for i in range(sent)] + ["1000"]
    stalled.close()
    good.close()


async def test_a_client_that_stops_reading_after_a_replay_is_cut_at_the_write_timeout(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    # A quiet topic and no heartbeat for an hour: nothing is written after the replay, so
    # only the write-timeout timer can notice that the client does not read.
    gw = await make_gateway(
        route_doc(
            upstream,
            heartbeat_seconds=3600,
            write_timeout_seconds=0.5,
            ring_bytes=16 * 1024 * 1024,
            max_unsent_bytes=64 * 1024 * 1024,
        )
    )
    live = await connect(session, gw.url("/events/quiet"))
    await upstream.wait_open("quiet")
    # 4 MiB of history: far more than the kernel buffers of a client that never reads.
    await upstream.publish("quiet", *events("quiet", 0, 128, size=32 * 1024))
    await live.wait_events(128)
    started = asyncio.get_running_loop().time()
    _, stalled = await _stalled_reader(gw.port, "/events/quiet", "Last-Event-ID: 0\r\n")

    def slow() -> float:
        return gw.metric("sse_gateway_connections_closed_total", route="r", outcome="slow")

    async with asyncio.timeout(5):
        # Nothing signals a close to the test: poll the metric, bounded by the timeout.
        while not slow():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.5 <= elapsed < 2.5, elapsed
    assert gw.metric("sse_gateway_subscribers", route="r") == 1
    stalled.close()
    live.close()


async def test_the_write_timeout_timer_runs_only_while_the_transport_is_backed_up() -> None:
    clock = FakeClock()
    transport = FakeTransport()
    sub = fake_downstream(transport, clock, max_unsent_bytes=1_000_000)
    outcomes = []
    sub.pause_writing()
    clock.advance(4)
    sub.resume_writing()  # drained in time: the timer is gone
    clock.advance(10)
    outcomes.append(sub.outcome)
    sub.pause_writing()
    sub.pause_writing()  # one timer per backed-up stream, however often it is told
    clock.advance(4.9)
    outcomes.append(sub.outcome)
    clock.advance(0.2)
    outcomes.append(sub.outcome)
    assert outcomes == [None, None, "slow"]
    assert transport.aborted


async def test_idle_stream_carries_heartbeats(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, heartbeat_seconds=0.05))
    client = await connect(session, gw.url("/events/quiet"))
    await client.wait_for(lambda c: bytes(c.raw).count(HEARTBEAT) >= 3)
    assert client.events == []
    assert gw.metric("sse_gateway_heartbeats_total", route="r") >= 3
    client.close()


async def test_heartbeats_never_split_an_event(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, heartbeat_seconds=0.02))
    client = await connect(session, gw.url("/events/mixed"))
    await upstream.wait_open("mixed")
    for i in range(5):
        # Send half an event, and hold the rest back until the subscriber has been sent a
        # heartbeat: the gateway holds an incomplete event exactly when a heartbeat is due.
        beats = bytes(client.raw).count(HEARTBEAT)
        await upstream.send("mixed", f"id: {i}\ndata: line one\n".encode())
        await client.wait_for(lambda c, n=beats: bytes(c.raw).count(HEARTBEAT) > n)  # type: ignore[misc]
        await upstream.send("mixed", b"data: line two\n\n")
        await client.wait_events(i + 1)
    assert bytes(client.raw).startswith(b": ok\nretry: 3000\n\n")
    blocks = bytes(client.raw).removeprefix(b": ok\nretry: 3000\n\n").split(b"\n\n")
    for block in blocks[:-1]:
        lines = block.split(b"\n")
        assert lines == [b": heartbeat"] or not any(line.startswith(b":") for line in lines), block
    assert [e.data for e in client.events] == ["line one\nline two"] * 5
    assert [e.id for e in client.events] == ["0", "1", "2", "3", "4"]
    client.close()


async def test_http10_client_gets_an_unframed_stream(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /events/old HTTP/1.0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    await upstream.wait_open("old")
    await upstream.publish("old", *events("old", 1, 1))
    body = await asyncio.wait_for(reader.readuntil(b"data: old 1 \n\n"), 5)
    assert body == b": ok\nretry: 3000\n\nid: 1\ndata: old 1 \n\n"
    writer.close()


async def test_chunked_stream_frames_whole_batches(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /events/c HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Transfer-Encoding: chunked" in head
    await upstream.wait_open("c")
    await upstream.publish("c", *events("c", 1, 3))
    body = await asyncio.wait_for(reader.readuntil(b"data: c 3 \n\n\r\n"), 5)
    payload = b"id: 1\ndata: c 1 \n\nid: 2\ndata: c 2 \n\nid: 3\ndata: c 3 \n\n"
    # One upstream read of three events is one chunk: one write per subscriber.
    assert body == PREAMBLE_CHUNK + b"%x\r\n" % len(payload) + payload + b"\r\n"
    writer.close()


async def test_shutdown_ends_streams_cleanly_and_readyz_turns_503(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    client = await connect(session, gw.url("/events/s"))
    await upstream.wait_open("s")
    async with session.get(gw.url("/readyz")) as resp:
        assert resp.status == 200
    gw.app[LIFECYCLE].ready = False
    async with session.get(gw.url("/readyz")) as resp:
        assert resp.status == 503
    # A stream request while draining: not a 503 (EventSource would give up for good) but
    # an empty stream that tells the client when to come back, then ends.
    async with session.get(gw.url("/events/s")) as resp:
        assert resp.status == 200
        assert await resp.read() == b": ok\nretry: 3000\n"
    await gw.runner.cleanup()
    await client.wait_end()
    # A clean end: the chunked body was terminated, not cut (aiohttp would raise otherwise).
    assert client.response.content.at_eof()
    await upstream.wait_closed("s")
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="shutdown") == 1


async def test_metrics_endpoint_exposes_the_core_series(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    client = await connect(session, gw.url("/events/m"))
    await upstream.wait_open("m")
    await upstream.publish("m", *events("m", 1, 2))
    await client.wait_events(2)
    async with session.get(gw.url("/metrics")) as resp:
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for line in (
        'sse_gateway_subscribers{route="r"} 1.0',
        'sse_gateway_topics{route="r"} 1.0',
        'sse_gateway_upstream_connections{route="r",state="connected"} 1.0',
        'sse_gateway_upstream_connections{route="r",state="backoff"} 0.0',
        'sse_gateway_events_received_total{route="r"} 2.0',
        'sse_gateway_events_delivered_total{route="r"} 2.0',
    ):
        assert line in text.splitlines(), line
    assert not re.search(r"_created\b", text)
    client.close()


async def test_subscriber_sockets_have_nodelay(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    client = await connect(session, gw.url("/events/n"))
    await upstream.wait_open("n")
    (topic,) = gw.hub.topics.values()
    (sub,) = topic.subscribers
    sock = sub._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    client.close()


async def test_shutdown_does_not_wait_for_a_subscriber_that_is_not_reading(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, max_unsent_bytes=64 * 1024 * 1024))
    good = await connect(session, gw.url("/events/stall"))
    _, stalled = await _stalled_reader(gw.port, "/events/stall")
    await upstream.wait_open("stall")
    await good.wait_for(lambda c: b"retry: 3000\n" in bytes(c.raw))
    (topic,) = gw.hub.topics.values()
    for batch in range(400):  # bounded: until the stalled socket has a real backlog
        await upstream.publish("stall", *events("stall", batch, 1, size=32 * 1024))
        await good.wait_events(batch + 1)
        stuck = max(topic.subscribers, key=lambda s: s._transport.get_write_buffer_size())
        if stuck._transport.get_write_buffer_size() > 256 * 1024:
            break
    assert stuck._transport.get_write_buffer_size() > 256 * 1024
    # A drain wait on the stalled client would last the whole shutdown timeout: make that
    # 30 s, so the 10 s bound below fails if shutdown waits on it.
    gw.runner._shutdown_timeout = 30
    async with asyncio.timeout(10):
        await gw.runner.cleanup()
    await good.wait_end()
    assert good.response.content.at_eof()
    stalled.close()


async def test_a_client_gone_before_its_stream_starts_is_not_a_server_error(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream))
    with LogWatcher("aiohttp") as aiohttp_log, LogWatcher("gateway") as log:
        for _ in range(20):  # bounded: send a request and hang up at once, abruptly
            sock = socket.socket()
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, b"GET /events/gone HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()
        # A request that completes afterwards proves the gateway handled all of the above.
        head = await raw_request(gw.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.split()[1] == b"404"
        await log.until(lambda lines: any("path=/nope" in line for line in lines))
    assert not any("Error handling request" in line for line in aiohttp_log.records)
    assert not any("status=500" in line for line in log.records)


async def _raw_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await reader.readuntil(b"retry: 3000\n\n\r\n") == PREAMBLE_CHUNK
    return reader, writer


async def test_an_established_stream_keeps_no_handler_task_or_aiohttp_connection(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    first = await _raw_stream(gw.port, "/events/d")
    await upstream.wait_open("d")
    tasks = len(asyncio.all_tasks())
    server = gw.runner.server
    assert server is not None
    streams = [await _raw_stream(gw.port, "/events/d") for _ in range(20)]
    # 20 more subscribers, yet no task more (aiohttp's handler runs two per connection) and
    # none of them in aiohttp's connection table: the socket belongs to the stream.
    assert len(asyncio.all_tasks()) <= tasks
    # aiohttp forgets a connection when its handler task has finished, a loop turn later.
    async with asyncio.timeout(5):
        while server.connections:  # noqa: ASYNC110 (no event for it: bounded poll)
            await asyncio.sleep(0)
    assert gw.metric("sse_gateway_subscribers", route="r") == 21
    await upstream.publish("d", *events("d", 1, 1))
    for reader, _ in [first, *streams]:
        async with asyncio.timeout(5):
            assert (
                await reader.readuntil(b"data: d 1 \n\n\r\n") == b"12\r\nid: 1\ndata: d 1 \n\n\r\n"
            )
    for _, writer in [first, *streams]:
        writer.close()
    await upstream.wait_closed("d")
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="gone") == 21


async def test_bytes_a_client_sends_after_its_request_are_ignored(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    reader, writer = await _raw_stream(gw.port, "/events/p")
    await upstream.wait_open("p")
    # A pipelined second request and some garbage: no second response, no error, no end.
    writer.write(b"GET /events/q HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00junk" * 1000)
    await writer.drain()
    await upstream.publish("p", *events("p", 1, 1))
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"data: p 1 \n\n\r\n") == b"12\r\nid: 1\ndata: p 1 \n\n\r\n"
    assert upstream.subscribers("q") == 0
    assert gw.metric("sse_gateway_subscribers", route="r") == 1
    writer.close()


async def test_a_client_that_half_closes_ends_its_stream(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(
        route_doc(upstream, linger_seconds=0), limits={"max_subscribers_per_client": 1}
    )
    reader, writer = await _raw_stream(gw.port, "/events/h")
    await upstream.wait_open("h")
    writer.write_eof()  # FIN: the client is done
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # the gateway closes its side too
    await upstream.wait_closed("h")
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="gone") == 1
    assert gw.metric("sse_gateway_subscribers", route="r") == 0
    # The client's admission slot was given back with the stream: a new stream is admitted.
    _, writer2 = await _raw_stream(gw.port, "/events/h")
    writer2.close()
    writer.close()


async def test_a_stream_the_gateway_ends_gets_the_last_chunk_then_the_close(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    reader, writer = await _raw_stream(gw.port, "/events/e")
    await upstream.wait_open("e")
    gw.hub.close_route_topics(lambda target: False, "reload")
    async with asyncio.timeout(5):
        # The retry hint, then the chunked terminator, then EOF.
        assert await reader.read() == b"c\r\nretry: 3000\n\r\n0\r\n\r\n"
    writer.close()


async def test_a_client_that_keeps_sending_after_its_request_is_cut_off(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    reader, writer = await _raw_stream(gw.port, "/events/k")
    await upstream.wait_open("k")
    try:
        for _ in range(100):  # bounded: 100 x 8 KiB, past the 64 KiB a stream may be sent
            writer.write(b"x" * 8192)
            await writer.drain()
    except ConnectionError:
        pass  # cut off while still sending
    # The gateway closes the stream: EOF, or a reset (it closed with our bytes unread).
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(5):
            await reader.read()
    await upstream.wait_closed("k")
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="error") == 1
    writer.close()


async def _gateway_with_hooks(
    upstream: Upstream,
    *,
    middleware: Any = None,
    on_prepare: Any = None,
    **route_options: Any,
) -> tuple[web.Application, web.AppRunner, int]:
    """A gateway whose app gets a test middleware or response-prepare hook before it starts:
    how a test makes the client leave at an exact point of the stream's start."""
    doc = {
        "routes": [route_doc(upstream, **route_options)],
        "limits": {"max_subscribers_per_client": 0, "max_connections_per_second": 0},
        "metrics": {"listen": ""},
    }
    app = make_app(from_document(doc, {}), metrics=Metrics(CollectorRegistry()))
    if middleware is not None:
        app.middlewares.append(middleware)
    if on_prepare is not None:
        app.on_response_prepare.append(on_prepare)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return app, runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    assert transport is not None
    transport.abort()  # the client's reset, seen by the server at this exact point


@pytest.mark.parametrize("point", ["before prepare", "during prepare"])
async def test_a_client_gone_at_any_point_of_the_stream_start_ends_it_quietly(
    upstream: Upstream, point: str
) -> None:
    @web.middleware
    async def leave_first(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/events/"):
            _abort(request)
        return await handler(request)  # type: ignore[no-any-return]

    async def leave_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/events/"):
            _abort(request)

    hooks: dict[str, Any] = (
        {"middleware": leave_first}
        if point == "before prepare"
        else {"on_prepare": leave_on_prepare}
    )
    # The topic is opened before the response starts (its upstream's answer decides the
    # status): a client gone during prepare leaves it to linger, here for no time at all.
    app, runner, port = await _gateway_with_hooks(upstream, **hooks, linger_seconds=0)
    try:
        with LogWatcher("aiohttp") as aiohttp_log, LogWatcher("gateway") as log:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /events/gone HTTP/1.1\r\nHost: x\r\n\r\n")
                async with asyncio.timeout(5):
                    # The server reset the connection: nothing, or a reset, comes back.
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read() == b""
                writer.close()
            head = await raw_request(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            assert head.split()[1] == b"404"
            await log.until(lambda lines: any("path=/nope" in line for line in lines))
        assert not any("Error handling request" in line for line in aiohttp_log.records)
        assert not any("status=500" in line for line in log.records)
        assert app[ADMISSION].total == 0  # every admission slot was given back
        assert app[HUB].topics == {}
    finally:
        await runner.cleanup()


def _dechunk(wire: bytes) -> bytes:
    body, rest = b"", wire
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        body, rest = body + rest[:size], rest[size + 2 :]
    return body


async def test_the_preamble_is_one_block_and_the_goodbye_adds_none(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    """The preamble is one block (a client knows it is subscribed); the goodbye's `retry:` is
    taken by browsers when they parse its line and, left unterminated, dispatches nothing in
    clients that dispatch any block holding a retry (httpx-sse) or any block at all."""
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    reader, writer = await _raw_stream(gw.port, "/events/pre")
    await upstream.wait_open("pre")
    await upstream.publish("pre", *events("pre", 1, 1))
    async with asyncio.timeout(5):
        first = await reader.readuntil(b"data: pre 1 \n\n\r\n")
        gw.hub.close_route_topics(lambda target: False, "reload")
        rest = await reader.read()
    writer.close()
    body = _dechunk(PREAMBLE_CHUNK + first + rest)
    assert body == b": ok\nretry: 3000\n\nid: 1\ndata: pre 1 \n\nretry: 3000\n"
    parser = Parser()
    assert parser.feed(body) == events("pre", 1, 1)
    parser.close()
    assert parser.retry_ms == 3000
    # Two blank lines: the preamble's and the event's; the goodbye ends no block.
    assert body.count(b"\n\n") == 2
    assert body.endswith(b"\n\nretry: 3000\n")

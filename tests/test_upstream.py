"""The upstream client against a real aiohttp upstream, with time recorded instead of waited."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import from_document
from gateway.core.answer import Answer
from gateway.core.route import RouteTable, Target
from gateway.metrics import Metrics
from gateway.sse import Event
from gateway.timing import Backoff
from gateway.upstream.client import UpstreamClient

from .support import FakeClock, Upstream, start_runner


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.states: list[str] = []
        self.drops: list[tuple[str, int]] = []
        self.answers: list[Answer] = []
        self.retries: list[int] = []

    def publish(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def set_state(self, state: str) -> None:
        self.states.append(state)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops.append((reason, count))

    def answered(self, answer: Answer) -> None:
        self.answers.append(answer)

    def retry(self, ms: int) -> None:
        self.retries.append(ms)


class RecordingClock(FakeClock):
    """Records every reconnect wait and lets the client go on only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.waiting = asyncio.Event()
        self.proceed = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.waiting.set()
        await self.proceed.wait()
        self.proceed.clear()


class ScriptedUpstream:
    """A real aiohttp SSE backend: request n gets `bodies[n]` (the last one repeated), then the
    stream ends; a `None` body is answered with a 502."""

    def __init__(self, *bodies: bytes | None) -> None:
        self.bodies = bodies
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream/{{topic}}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream/{topic}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2)
        self.port = await start_runner(self.runner)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = self.bodies[min(self.requests, len(self.bodies) - 1)]
        self.requests += 1
        if body is None:
            return web.Response(status=502, text="bad gateway")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        return resp  # the stream ends: the client sees a clean EOF


def target_for(upstream: Upstream | ScriptedUpstream, **route: object) -> Target:
    doc = {"routes": [{"name": "r", "path": "/e/{topic}", "upstream": upstream.url(), **route}]}
    return RouteTable(from_document(doc, {"TOKEN": "s3cret"}).routes).resolve("/e/x", [])


async def test_reconnect_waits_at_least_the_upstreams_retry_and_resumes_with_last_event_id(
    upstream: Upstream,
) -> None:
    clock = RecordingClock()
    sink = RecordingSink()
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, Metrics(CollectorRegistry()), clock, random.Random(0))
        task = asyncio.create_task(client.stream(target_for(upstream), sink))
        try:
            await upstream.wait_open("x")
            await upstream.send("x", b"retry: 7000\nid: 41\ndata: a\n\nid: 42\ndata: b\n\n")
            await upstream.stop()  # the stream breaks
            await upstream.start()
            await asyncio.wait_for(clock.waiting.wait(), 5)  # the client reached its wait
            assert clock.waits[0] >= 7.0
            clock.proceed.set()
            await upstream.wait_connections(2)
            assert upstream.connections[1].headers["Last-Event-ID"] == "42"
            assert [e.data for e in sink.events] == ["a", "b"]
            assert sink.states[:3] == ["connecting", "connected", "backoff"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_service_headers_from_the_environment_reach_the_upstream(upstream: Upstream) -> None:
    headers = {"Authorization": {"env": "TOKEN", "prefix": "Bearer "}}
    sink = RecordingSink()
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, Metrics(CollectorRegistry()), FakeClock())
        task = asyncio.create_task(
            client.stream(target_for(upstream, upstream_headers=headers), sink)
        )
        try:
            await upstream.wait_connections(1)
            assert upstream.connections[0].headers["Authorization"] == "Bearer s3cret"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_backoff_grows_is_capped_jittered_and_floored() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)
    assert backoff.next_delay(floor_seconds=20.0) == 20.0
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.mark.parametrize("seed", range(3))
def test_backoff_jitter_spreads_a_thundering_herd(seed: int) -> None:
    rng = random.Random(seed)
    firsts = [Backoff(1.0, 30.0, rng=rng).next_delay() for _ in range(100)]
    assert max(firsts) - min(firsts) > 0.3


class CountingClock(FakeClock):
    """Records each reconnect wait and goes on at once, until `limit` waits: then it holds."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.waits: list[float] = []
        self.reached = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.time += seconds
        if len(self.waits) >= self.limit:
            self.reached.set()
            await asyncio.Event().wait()  # held here until the test cancels the stream
        await asyncio.sleep(0)


async def test_5000_consecutive_failures_keep_retrying_within_the_maximum_delay() -> None:
    # A refused port: every attempt fails at once, as for an upstream down for a day.
    gone = Upstream()
    await gone.start()
    await gone.stop()
    clock = CountingClock(5000)
    sink = RecordingSink()
    target = target_for(gone, reconnect_initial_seconds=0.5, reconnect_max_seconds=30)
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, Metrics(CollectorRegistry()), clock, random.Random(3))
        task = asyncio.create_task(client.stream(target, sink))
        reached = asyncio.create_task(clock.reached.wait())
        try:
            async with asyncio.timeout(120):
                await asyncio.wait({task, reached}, return_when=asyncio.FIRST_COMPLETED)
            assert not task.done(), task  # the runner never raised (OverflowError at 1,024)
            assert len(clock.waits) == 5000
            assert max(clock.waits) <= 30.0
            assert min(clock.waits[10:]) >= 15.0
        finally:
            task.cancel()
            reached.cancel()
            await asyncio.gather(task, reached, return_exceptions=True)


async def run_until_waits(
    upstream: ScriptedUpstream, waits: int, metrics: Metrics, **route: object
) -> CountingClock:
    """Run one topic's stream against `upstream` until its `waits`-th reconnect wait; the stream
    must still be running then (it never raised)."""
    clock = CountingClock(waits)
    target = target_for(upstream, **route)
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session, metrics, clock, random.Random(5))
        task = asyncio.create_task(client.stream(target, RecordingSink()))
        reached = asyncio.create_task(clock.reached.wait())
        try:
            async with asyncio.timeout(10):
                await asyncio.wait({task, reached}, return_when=asyncio.FIRST_COMPLETED)
            assert not task.done(), task
        finally:
            task.cancel()
            reached.cancel()
            await asyncio.gather(task, reached, return_exceptions=True)
    return clock


@pytest.mark.parametrize(
    "retry",
    [b"99999999999", b"9" * 309, b"%d" % 10**400],
    ids=["eleven-digits", "309-digits", "10**400"],
)
async def test_an_upstreams_huge_retry_is_capped_at_reconnect_max_seconds(retry: bytes) -> None:
    # Each response says `retry: <huge>` and ends. Uncapped, the topic was parked for years
    # (eleven digits: 3 years) or its runner crashed with OverflowError (10**400 / 1000).
    upstream = ScriptedUpstream(b"retry: " + retry + b"\n\n")
    await upstream.start()
    metrics = Metrics(CollectorRegistry())
    try:
        clock = await run_until_waits(
            upstream, 3, metrics, reconnect_initial_seconds=0.5, reconnect_max_seconds=2
        )
    finally:
        await upstream.stop()
    assert clock.waits == [2.0, 2.0, 2.0]  # honoured as a minimum, up to the operator's maximum
    assert upstream.requests == 3  # and the topic kept reconnecting
    sample = metrics.registry.get_sample_value
    assert sample("sse_gateway_upstream_backoff_seconds_count", {"route": "r"}) == 3
    assert sample("sse_gateway_upstream_backoff_seconds_sum", {"route": "r"}) == 6.0
    assert sample("sse_gateway_upstream_reconnects_total", {"route": "r"}) == 2


async def test_backing_off_is_a_warning_once_per_outage_not_per_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Three refusals (one outage), a stream that delivers then ends (a new outage), two more.
    upstream = ScriptedUpstream(None, None, None, b"id: 1\ndata: a\n\n", None)
    await upstream.start()
    metrics = Metrics(CollectorRegistry())
    caplog.set_level(logging.DEBUG, logger="gateway.upstream.client")
    try:
        clock = await run_until_waits(upstream, 6, metrics, reconnect_max_seconds=5)
    finally:
        await upstream.stop()
    records = [r for r in caplog.records if r.name == "gateway.upstream.client"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    url = upstream.url().format(topic="x")
    assert warnings == [
        f"upstream {url} for route r: HTTP status 502; backing off, "
        f"reconnecting in {clock.waits[0]:.2f}s",
        f"upstream {url} for route r: upstream closed the stream; backing off, "
        f"reconnecting in {clock.waits[3]:.2f}s",
    ]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert len([m for m in debug if "HTTP status 502; still backing off" in m]) == 4
    assert f"upstream {url} for route r delivers again after 3 failed attempts" in [
        r.getMessage() for r in records if r.levelno == logging.INFO
    ]
    count = metrics.registry.get_sample_value(
        "sse_gateway_upstream_backoff_seconds_count", {"route": "r"}
    )
    assert count == len(clock.waits) == 6

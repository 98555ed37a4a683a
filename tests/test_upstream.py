"""The upstream client against a real aiohttp upstream, with time recorded instead of waited."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.config import from_document
from gateway.core.route import RouteTable, Target
from gateway.metrics import Metrics
from gateway.sse import Event
from gateway.timing import Backoff
from gateway.upstream.client import UpstreamClient

from .support import FakeClock, Upstream


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.states: list[str] = []
        self.drops: list[tuple[str, int]] = []

    def publish(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    def set_state(self, state: str) -> None:
        self.states.append(state)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops.append((reason, count))


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


def target_for(upstream: Upstream, **route: object) -> Target:
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

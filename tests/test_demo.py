"""Tests for the bundled demo backend (gateway/demo.py) and the demo page it feeds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import gateway
from gateway.demo import DEMO_TOPICS, make_demo_app
from gateway.sse import Event, Parser, encode_retry

INTERVAL = 0.02
TIMEOUT = 5.0

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[..., Awaitable[TestServer]]


async def read_until(
    resp: aiohttp.ClientResponse,
    done: Callable[[list[Event]], bool],
) -> tuple[bytes, list[Event]]:
    """Read the stream until ``done(events)`` holds; returns the raw bytes and the events."""
    parser = Parser()
    raw = bytearray()
    events: list[Event] = []
    async with asyncio.timeout(TIMEOUT):
        while not done(events):
            chunk = await resp.content.readany()
            assert chunk, "stream ended before the condition held"
            raw += chunk
            events += parser.feed(chunk)
    return bytes(raw), events


def at_least(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(events) >= n


def int_ids(events: list[Event]) -> list[int]:
    ids = []
    for event in events:
        assert event.id is not None
        ids.append(int(event.id))
    return ids


@asynccontextmanager
async def serve(app: web.Application, **runner_kwargs: object) -> AsyncIterator[str]:
    """Run ``app`` on a real socket with explicit runner settings; yields the base URL."""
    runner = web.AppRunner(app, **runner_kwargs)  # type: ignore[arg-type]
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("topic", DEMO_TOPICS)
async def test_topic_streams_consecutive_ids_and_typed_events(
    aiohttp_client: ClientFactory, topic: str
) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    async with client.get(f"/stream/{topic}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        _, events = await read_until(resp, at_least(12))

    ids = int_ids(events)
    assert ids == list(range(ids[0], ids[0] + len(ids)))

    if topic == "clock":
        assert {e.event for e in events} == {"tick"}
        stamps = [datetime.fromisoformat(e.data) for e in events]
        assert all(
            s.utcoffset() is not None and s.utcoffset() == stamps[0].utcoffset() for s in stamps
        )
        assert stamps == sorted(stamps)
    elif topic == "counter":
        assert {e.event for e in events} == {"message"}
        values = [int(e.data) for e in events]
        assert values == list(range(values[0], values[0] + len(values)))
    else:
        assert {e.event for e in events} == {"price"}
        # Compact JSON: no spaces after separators.
        assert all(" " not in e.data for e in events)
        quotes = [json.loads(e.data) for e in events]
        assert all(set(q) == {"symbol", "price"} for q in quotes)
        assert all(isinstance(q["price"], float) and q["price"] > 0 for q in quotes)
        assert 3 <= len({q["symbol"] for q in quotes}) <= 4


async def test_retry_is_sent_before_any_event(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    async with client.get("/stream/counter") as resp:
        raw, events = await read_until(resp, at_least(1))
    assert raw.startswith(encode_retry(2000))
    assert b"retry" in raw[: raw.index(b"data")]
    assert events


async def test_unknown_topic_is_404(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    async with client.get("/stream/nope") as resp:
        assert resp.status == 404
    async with client.get("/stream/") as resp:
        assert resp.status == 404


async def test_non_get_is_405(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    async with client.post("/stream/clock") as resp:
        assert resp.status == 405


@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_replays_exactly_the_events_after_last_event_id(
    aiohttp_client: ClientFactory, via: str
) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    async with client.get("/stream/counter") as resp:
        _, first = await read_until(resp, at_least(8))
    # Resume from the middle of what we saw, after disconnecting: the events produced while
    # nobody listened must come from the history too.
    resume_from = first[3]
    assert resume_from.id is not None

    headers = {"Last-Event-ID": resume_from.id} if via == "header" else {}
    params = {"lastEventId": resume_from.id} if via == "query" else {}
    target = int(first[-1].id or 0) + 5
    async with client.get("/stream/counter", headers=headers, params=params) as resp:
        _, resumed = await read_until(
            resp, lambda evs: bool(evs) and int(evs[-1].id or 0) >= target
        )

    ids = int_ids(resumed)
    assert ids == list(range(int(resume_from.id) + 1, ids[-1] + 1))
    # Replayed events are the same events, not regenerated ones.
    assert resumed[: len(first) - 4] == first[4:]


@pytest.mark.parametrize("last_event_id", ["1", "not-a-number", "999999"])
async def test_unknown_or_evicted_last_event_id_starts_live(
    aiohttp_client: ClientFactory, last_event_id: str
) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL, history_events=3))
    async with client.get("/stream/counter") as resp:
        _, seen = await read_until(resp, at_least(6))
    newest_seen = int_ids(seen)[-1]

    async with client.get("/stream/counter", headers={"Last-Event-ID": last_event_id}) as resp:
        _, events = await read_until(resp, at_least(2))
    ids = int_ids(events)
    assert ids[0] > newest_seen
    assert ids[1] == ids[0] + 1


async def test_handler_ends_after_client_disconnect(aiohttp_server: ServerFactory) -> None:
    finished = asyncio.Event()

    @web.middleware
    async def track(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            finished.set()

    app = make_demo_app(interval_seconds=INTERVAL)
    app.middlewares.append(track)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/stream/clock")) as resp:
            await read_until(resp, at_least(2))
        assert not finished.is_set()
    async with asyncio.timeout(TIMEOUT):
        await finished.wait()


async def test_handler_ends_after_disconnect_without_handler_cancellation() -> None:
    finished = asyncio.Event()

    @web.middleware
    async def track(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            finished.set()

    app = make_demo_app(interval_seconds=INTERVAL)
    app.middlewares.append(track)
    async with serve(app, handler_cancellation=False) as base:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/stream/prices") as resp,
        ):
            await read_until(resp, at_least(2))
        # The next failed write is what notices the disconnect.
        async with asyncio.timeout(TIMEOUT):
            await finished.wait()


async def test_shutdown_with_open_stream_is_quick_and_stops_producers() -> None:
    app = make_demo_app(interval_seconds=INTERVAL)
    # A long shutdown timeout: only the on_shutdown wake-up can make this finish quickly.
    runner = web.AppRunner(app, shutdown_timeout=30.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/stream/clock") as resp,
    ):
        await read_until(resp, at_least(2))
        async with asyncio.timeout(TIMEOUT):
            await runner.cleanup()
            # The stream ends cleanly once the server has shut down.
            rest = await resp.content.read()
        assert isinstance(rest, bytes)

    producers = [
        t for t in asyncio.all_tasks() if t.get_name().startswith("demo-producer-") and not t.done()
    ]
    assert producers == []


async def test_producers_run_with_no_subscribers(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_demo_app(interval_seconds=INTERVAL))
    # Watch only the clock; the counter has never had a subscriber meanwhile.
    async with client.get("/stream/clock") as resp:
        await read_until(resp, lambda evs: bool(evs) and int(evs[-1].id or 0) > 5)
    async with client.get("/stream/counter", headers={"Last-Event-ID": "1"}) as resp:
        _, counter = await read_until(resp, at_least(3))
    assert int_ids(counter)[:3] == [2, 3, 4]
    assert [e.data for e in counter[:3]] == ["2", "3", "4"]


@pytest.mark.parametrize(
    "kwargs", [{"interval_seconds": 0.0}, {"interval_seconds": -1.0}, {"history_events": 0}]
)
def test_invalid_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make_demo_app(**kwargs)  # type: ignore[arg-type]


class _PageScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            # data: URLs are inline (the empty favicon that spares a /favicon.ico request).
            if name in {"src", "href"} and value and not value.startswith("data:"):
                self.external.append(value)


def test_static_page_is_self_contained_and_wired_to_eventsource() -> None:
    page = Path(gateway.__file__).parent / "static" / "index.html"
    assert page.is_file()
    html = page.read_text(encoding="utf-8")

    assert 'new EventSource("/events/" + encodeURIComponent(topic))' in html
    for event_type in ("message", "tick", "price"):
        assert f'"{event_type}"' in html
    assert "addEventListener(" in html
    assert "location.hash" in html
    assert "innerHTML" not in html

    scan = _PageScan()
    scan.feed(html)
    assert {"topic", "state", "count", "events"} <= scan.ids
    assert scan.external == []
    assert "http://" not in html
    assert "https://" not in html

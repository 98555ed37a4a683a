"""The bundled demo backend: an ordinary SSE server that the default gateway config proxies.

It owns a handful of synthetic topics (``DEMO_TOPICS``), one producer task per topic that emits
events on a fixed interval whether or not anyone listens, a bounded per-topic history for
``Last-Event-ID`` resume, and the ``GET /stream/{topic}`` handler that fans those events out.
It deliberately knows nothing about the gateway, so it behaves like any third-party upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from .sse import Event, encode, encode_retry

__all__ = ["DEMO_TOPICS", "make_demo_app"]

DEMO_TOPICS: tuple[str, ...] = ("clock", "counter", "prices")

RETRY_MS = 2000

# (event type, data) pairs; the topic assigns ids so every producer gets resume for free.
_Payload = tuple[str, str]


class _Topic:
    """One topic's history and the condition its subscribers wait on."""

    def __init__(self, name: str, history_events: int) -> None:
        self.name = name
        self.history: deque[tuple[int, Event]] = deque(maxlen=history_events)
        self.last_id = 0
        self.changed = asyncio.Condition()

    async def publish(self, payloads: list[_Payload]) -> None:
        async with self.changed:
            for event_type, data in payloads:
                self.last_id += 1
                event = Event(data=data, event=event_type, id=str(self.last_id))
                self.history.append((self.last_id, event))
            self.changed.notify_all()

    def resume_cursor(self, last_event_id: str | None) -> int:
        """Where a new subscriber starts: after ``last_event_id`` if we still hold it, else live."""
        if last_event_id is not None and self.history:
            try:
                wanted = int(last_event_id)
            except ValueError:
                return self.last_id
            # The oldest held id itself counts: replay starts *after* it, so nothing is lost.
            if self.history[0][0] <= wanted <= self.last_id:
                return wanted
        return self.last_id

    def events_after(self, cursor: int) -> list[tuple[int, Event]]:
        # A subscriber that fell further behind than the history simply skips ahead; for a
        # demo that is preferable to buffering without bound for a slow reader.
        return [item for item in self.history if item[0] > cursor]


@dataclass
class _DemoState:
    topics: dict[str, _Topic]
    interval_seconds: float
    closing: bool = False
    rng: random.Random = field(default_factory=random.Random)


_STATE = web.AppKey("demo_state", _DemoState)


def _clock() -> Callable[[], list[_Payload]]:
    def produce() -> list[_Payload]:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return [("tick", now)]

    return produce


def _counter() -> Callable[[], list[_Payload]]:
    value = 0

    def produce() -> list[_Payload]:
        nonlocal value
        value += 1
        return [("message", str(value))]

    return produce


def _prices(rng: random.Random) -> Callable[[], list[_Payload]]:
    prices = {"ACME": 101.25, "GLOBEX": 54.10, "INITECH": 12.75, "UMBRELLA": 230.00}

    def produce() -> list[_Payload]:
        out: list[_Payload] = []
        for symbol, price in prices.items():
            # Multiplicative steps keep the walk positive without a special case near zero.
            new_price = round(max(0.01, price * (1 + rng.gauss(0, 0.005))), 2)
            prices[symbol] = new_price
            data = json.dumps({"symbol": symbol, "price": new_price}, separators=(",", ":"))
            out.append(("price", data))
        return out

    return produce


def _producer_for(name: str, rng: random.Random) -> Callable[[], list[_Payload]]:
    if name == "clock":
        return _clock()
    if name == "counter":
        return _counter()
    if name == "prices":
        return _prices(rng)
    raise ValueError(f"no producer for demo topic {name!r}")


async def _run_producer(
    topic: _Topic, produce: Callable[[], list[_Payload]], interval: float
) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await topic.publish(produce())
        # Schedule against the loop clock so the cadence does not drift with publish latency.
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _producers(app: web.Application) -> AsyncIterator[None]:
    state = app[_STATE]
    state.closing = False
    tasks = [
        asyncio.create_task(
            _run_producer(topic, _producer_for(name, state.rng), state.interval_seconds),
            name=f"demo-producer-{name}",
        )
        for name, topic in state.topics.items()
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wake_subscribers(app: web.Application) -> None:
    # Runs before the server waits for in-flight handlers; without it every open stream would
    # hold shutdown until the runner's timeout expires.
    state = app[_STATE]
    state.closing = True
    for topic in state.topics.values():
        async with topic.changed:
            topic.changed.notify_all()


async def _stream(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    topic = state.topics.get(request.match_info["topic"])
    if topic is None:
        raise web.HTTPNotFound(text="unknown topic\n")

    last_event_id = request.headers.get("Last-Event-ID", request.query.get("lastEventId"))
    cursor = topic.resume_cursor(last_event_id)

    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(request)
    await resp.write(encode_retry(RETRY_MS))

    # A vanished client surfaces as a failed write (or as cancellation when the server runs
    # with handler_cancellation=True); either way the handler just ends, leaving no task behind.
    with contextlib.suppress(ConnectionResetError):
        while True:
            async with topic.changed:
                while not state.closing and topic.last_id <= cursor:
                    await topic.changed.wait()
                if state.closing:
                    break
                batch = topic.events_after(cursor)
            # Non-empty: last_id > cursor and the newest event is always in the history.
            cursor = batch[-1][0]
            # Written outside the lock so one slow client cannot stall the producer.
            await resp.write(b"".join(encode(event) for _, event in batch))
    return resp


def make_demo_app(*, interval_seconds: float = 1.0, history_events: int = 1000) -> web.Application:
    """Build the demo backend; producers start with the app and stop on its cleanup."""
    if interval_seconds <= 0:
        raise ValueError("interval_seconds must be positive")
    if history_events < 1:
        raise ValueError("history_events must be at least 1")
    app = web.Application()
    app[_STATE] = _DemoState(
        topics={name: _Topic(name, history_events) for name in DEMO_TOPICS},
        interval_seconds=interval_seconds,
    )
    app.cleanup_ctx.append(_producers)
    app.on_shutdown.append(_wake_subscribers)
    app.router.add_get("/stream/{topic}", _stream, allow_head=False)
    return app

"""The hub: topics, their subscribers, upstream lifecycle and fan-out. No HTTP here.

Invariants (DESIGN.md, "The data path"):
- One upstream per topic. `subscribe()` is synchronous, so the lookup and the
  creation of a topic cannot interleave with another subscriber's: 100
  subscribers arriving at once open exactly one upstream.
- One parse, one encode. An upstream batch is encoded once, framed once per
  framing in use (chunked or not), and the same bytes object is handed to
  every subscriber of that framing.
- Nobody waits for the slowest. `publish()` never awaits; a subscriber's
  `send()` is a non-blocking write that reports whether the subscriber is
  still there. Enforcing its unsent-bytes limit is the subscriber's job.
- Whole events only: a batch is written as one unit, so a subscriber joining
  between two publishes starts at an event boundary and a heartbeat written
  between two publishes can never land inside an event.
- Lifecycle: a topic whose last subscriber leaves lingers for the route's
  `linger_seconds`, then closes its upstream; a subscriber arriving during
  the linger keeps it open.
- Subscriber ↔ topic is many-to-many: a subscriber records the topics it is
  in (`topics`), so one stream can later follow several.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .errors import TopicLimit
from .metrics import Metrics, RouteMetrics
from .route import Target
from .sse import EncodeError, Event, encode, encode_many
from .timing import Clock, Timer

log = logging.getLogger(__name__)

# How subscriber bytes are framed on the wire (identity, HTTP/1.1 chunked...).
# The hub only groups subscribers by it so each framing is applied once per batch.
Framing = Callable[[bytes], bytes]


class Subscriber(Protocol):
    framing: Framing
    topics: list[Topic]

    def send(self, data: bytes) -> bool:
        """Write without waiting; False once the subscriber is gone or was cut off."""
        ...

    def close(self, outcome: str) -> None:
        """End the subscriber's stream (idempotent)."""
        ...


class UpstreamSink(Protocol):
    """What an upstream reports into: the topic it feeds."""

    def publish(self, events: Sequence[Event]) -> None: ...

    def set_connected(self, connected: bool) -> None: ...

    def dropped(self, reason: str, count: int = 1) -> None: ...


# Runs one topic's upstream until cancelled, feeding the sink. Injected by the
# composition root so the hub never sees aiohttp.
UpstreamFactory = Callable[[Target, UpstreamSink], Awaitable[None]]


class Topic:
    """One upstream subscription and the subscribers that share it."""

    __slots__ = (
        "_groups",
        "_hub",
        "_linger",
        "_snapshot",
        "_upstream",
        "connected",
        "key",
        "last_publish",
        "metrics",
        "subscribers",
        "target",
    )

    def __init__(self, hub: Hub, target: Target, metrics: RouteMetrics) -> None:
        self._hub = hub
        self.target = target
        self.key = target.topic_key
        self.metrics = metrics
        self.subscribers: dict[Subscriber, None] = {}
        self._groups: dict[Framing, dict[Subscriber, None]] = {}
        # Rebuilt only when membership changes, so publish iterates plain tuples.
        self._snapshot: tuple[tuple[Framing, tuple[Subscriber, ...]], ...] | None = None
        self._upstream: asyncio.Task[None] | None = None
        self._linger: Timer | None = None
        self.connected = False
        self.last_publish = hub.clock.now()

    # --- UpstreamSink ---------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        self.metrics.events_received.inc(len(events))
        count = len(events)
        try:
            raw = encode_many(events)
        except EncodeError:
            raw, count = self._encode_valid(events)
            if not count:
                return
        self.last_publish = self._hub.clock.now()
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple((f, tuple(g)) for f, g in self._groups.items())
        reached = 0
        written = 0
        for framing, group in snapshot:
            data = framing(raw)
            group_reached = 0
            for sub in group:
                if sub.send(data):
                    group_reached += 1
            reached += group_reached
            written += len(data) * group_reached
        # Counted once per batch (N at a time), never once per subscriber.
        if reached:
            self.metrics.events_delivered.inc(count * reached)
            self.metrics.bytes_written.inc(written)

    def _encode_valid(self, events: Sequence[Event]) -> tuple[bytes, int]:
        """Slow path: a batch holding an event the encoder refuses (CR/LF/NUL in a name)."""
        parts = []
        for event in events:
            try:
                parts.append(encode(event))
            except EncodeError:
                self.dropped("invalid")
        return b"".join(parts), len(parts)

    def set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.metrics.upstreams_connected.inc(1 if connected else -1)

    def dropped(self, reason: str, count: int = 1) -> None:
        self.metrics.dropped[reason].inc(count)

    # --- membership -------------------------------------------------------------

    def _add(self, sub: Subscriber) -> None:
        self.subscribers[sub] = None
        self._groups.setdefault(sub.framing, {})[sub] = None
        self._snapshot = None
        sub.topics.append(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _remove(self, sub: Subscriber) -> bool:
        if sub not in self.subscribers:
            return False
        del self.subscribers[sub]
        group = self._groups[sub.framing]
        del group[sub]
        if not group:
            del self._groups[sub.framing]
        self._snapshot = None
        if self in sub.topics:
            sub.topics.remove(self)
        return True

    def _start(self, factory: UpstreamFactory) -> None:
        self._upstream = asyncio.create_task(
            self._run_upstream(factory), name=f"upstream {self.key}"
        )

    async def _run_upstream(self, factory: UpstreamFactory) -> None:
        try:
            await factory(self.target, self)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("upstream runner for %s crashed", self.key)
        else:
            log.error("upstream runner for %s returned", self.key)
        # A runner retries by itself until cancelled; reaching here is a bug. Contain it to
        # this topic: end its subscribers so they reconnect and the topic starts afresh.
        self._hub._close_topic(self, "error")

    async def _stop(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        task, self._upstream = self._upstream, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.set_connected(False)


class Hub:
    """All topics of one process."""

    def __init__(self, upstream_factory: UpstreamFactory, clock: Clock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self._factory = upstream_factory
        self._topics: dict[str, Topic] = {}
        self._route_topics: dict[str, int] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def topics(self) -> dict[str, Topic]:
        return self._topics

    def is_closing(self) -> bool:
        """True once `close()` began; new subscribers are refused from then on."""
        return self._closing

    def admit(self, target: Target) -> None:
        """Raise TopicLimit if subscribing to `target` would open a topic over its route's cap.

        Checked before a response starts, so a refusal is a clean 503; `subscribe` checks again.
        """
        route = target.route
        if (
            target.topic_key not in self._topics
            and self._route_topics.get(route.name, 0) >= route.max_topics
        ):
            raise TopicLimit(
                f"route {route.name!r} has its maximum of {route.max_topics} topics open",
                headers={"Retry-After": "5"},
            )

    def subscribe(self, target: Target, sub: Subscriber) -> Topic:
        """Add `sub` to the target's topic, opening the topic's upstream if it is new."""
        if self._closing:
            raise RuntimeError("hub is closing")
        self.admit(target)
        topic = self._topics.get(target.topic_key)
        if topic is None:
            route = target.route.name
            rm = self.metrics.route(route)
            topic = self._topics[target.topic_key] = Topic(self, target, rm)
            self._route_topics[route] = self._route_topics.get(route, 0) + 1
            rm.topics.inc()
            topic._start(self._factory)
        topic._add(sub)
        topic.metrics.subscribers.inc()
        return topic

    def unsubscribe(self, topic: Topic, sub: Subscriber) -> None:
        """Remove `sub`; the last one out starts the topic's linger timer."""
        if not topic._remove(sub):
            return
        topic.metrics.subscribers.dec()
        if topic.subscribers or self._topics.get(topic.key) is not topic:
            return
        topic._linger = self.clock.call_later(
            topic.target.route.linger_seconds, lambda: self._expire(topic)
        )

    def _expire(self, topic: Topic) -> None:
        topic._linger = None
        if not topic.subscribers and self._topics.get(topic.key) is topic:
            self._close_topic(topic, "normal")

    def _close_topic(self, topic: Topic, outcome: str) -> None:
        if self._topics.get(topic.key) is topic:
            del self._topics[topic.key]
            self._route_topics[topic.target.route.name] -= 1
            topic.metrics.topics.dec()
        for sub in list(topic.subscribers):
            sub.close(outcome)
        task = asyncio.create_task(topic._stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Shutdown: end every subscriber's stream and close every upstream."""
        self._closing = True
        for topic in list(self._topics.values()):
            self._close_topic(topic, "shutdown")
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

"""The hub: every topic of the process, their lifecycle, admission and drain. No HTTP here.

- One upstream per topic. `subscribe()` is synchronous, so the lookup and the
  creation of a topic cannot interleave with another subscriber's: 100
  subscribers arriving at once open exactly one upstream.
- Lifecycle: a topic whose last subscriber leaves lingers for the route's
  `linger_seconds`, then closes its upstream; a subscriber arriving during
  the linger keeps it open. A topic whose upstream runner fails is closed
  and its subscribers reconnect. Topics per route are capped.
- Drain: streams end in jittered waves, so clients do not return at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable

from ..errors import TopicLimit
from ..metrics import Metrics
from ..timing import Clock
from .route import Target
from .topic import Subscriber, Topic, Upstreams

log = logging.getLogger(__name__)


class Hub:
    """All topics of one process."""

    def __init__(self, upstreams: Upstreams, clock: Clock, metrics: Metrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.upstreams = upstreams
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

    def subscribe(self, target: Target, sub: Subscriber, last_event_id: str | None = None) -> Topic:
        """Add `sub` to the target's topic (opening it if new), resuming after `last_event_id`."""
        if self._closing:
            raise RuntimeError("hub is closing")
        self.admit(target)
        topic = self._topics.get(target.topic_key)
        if topic is None:
            route = target.route
            rm = self.metrics.route(route.name)
            topic = Topic(target, rm, self.clock, self.upstreams, self._failed)
            self._topics[target.topic_key] = topic
            self._route_topics[route.name] = self._route_topics.get(route.name, 0) + 1
            rm.topics.inc()
            topic._start()
        topic.metrics.subscribers.inc()
        topic._add(sub, last_event_id)
        return topic

    def unsubscribe(self, topic: Topic, sub: Subscriber) -> tuple[int, int]:
        """Remove `sub`; the last one out starts the topic's linger timer.

        Returns the (events, bytes) the topic handed `sub` live, for its access log line.
        """
        handed = topic._remove(sub)
        if handed is None:
            return (0, 0)
        topic.metrics.subscribers.dec()
        if topic.subscribers or self._topics.get(topic.key) is not topic:
            return handed
        route = topic.target.route
        # A direct topic is one client's own upstream request: nobody else can reuse it.
        linger = 0.0 if route.mode == "direct" else route.linger_seconds
        topic._linger = self.clock.call_later(linger, lambda: self._expire(topic))
        return handed

    def _expire(self, topic: Topic) -> None:
        topic._linger = None
        if not topic.subscribers and self._topics.get(topic.key) is topic:
            self._close_topic(topic, "normal")

    def _failed(self, topic: Topic, outcome: str) -> None:
        self._close_topic(topic, outcome)

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

    def close_route_topics(self, keep: Callable[[Target], bool], outcome: str) -> int:
        """End every topic whose target `keep` rejects (a reload changed its route)."""
        closing = [t for t in self._topics.values() if not keep(t.target)]
        for topic in closing:
            self._close_topic(topic, outcome)
        return len(closing)

    def drain(self, window_seconds: float, waves: int = 20) -> asyncio.Event:
        """End every stream over `window_seconds`, in jittered waves of random subscribers.

        Scheduled at once; the returned event is set after the last wave.

        So a rolling deploy does not send every client back in the same instant: each
        one's stream ends at a different moment (with its retry hint), and they return
        spread over the window plus their retry range.
        """
        done = asyncio.Event()
        subs = [s for t in self._topics.values() for s in t.subscribers]
        if not subs or window_seconds <= 0:
            done.set()
            return done
        random.shuffle(subs)
        slot = window_seconds / waves
        remaining = waves

        def wave(members: list[Subscriber]) -> None:
            nonlocal remaining
            for sub in members:
                sub.close("shutdown")
            remaining -= 1
            if not remaining:
                done.set()

        for i in range(waves):
            self.clock.call_later(
                (i + random.random()) * slot, functools.partial(wave, subs[i::waves])
            )
        return done

    async def close(self) -> None:
        """Shutdown: end every subscriber's stream and close every upstream."""
        self._closing = True
        for topic in list(self._topics.values()):
            self._close_topic(topic, "shutdown")
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

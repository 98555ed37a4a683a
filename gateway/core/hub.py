"""The hub: every topic of the process, their lifecycle, admission and drain. No HTTP here.

- One upstream per topic. `subscribe()` is synchronous, so the lookup and the
  creation of a topic cannot interleave with another subscriber's: 100
  subscribers arriving at once open exactly one upstream.
- Lifecycle: a topic whose last subscriber leaves lingers for the route's
  `linger_seconds`, then closes its upstream; a subscriber arriving during
  the linger keeps it open. The linger timers are the hub's, not the topic's.
  A shared topic's upstream runner never ends it (the topic restarts it); a
  direct topic ends with its client's upstream. Topics per route are capped.
- One client cannot fill a route (shared mode). Opening a topic opens an
  upstream connection, so the hub remembers who opened each topic: opens
  per client address are rate-limited (a token bucket), and the topics a
  client opened that no other client has joined count against it, capped at
  a share of the route's `max_topics` (half by default). Both answer 429;
  everyone else keeps the rest. Direct routes are exempt: a direct topic is one client's own
  stream, already bounded by the per-client stream limit.
- A client may hold a topic before it subscribes (`open`, then `join` or
  `let_go`): the edge opens the topic, waits for its upstream's first answer
  and only then answers the client (README, "What reaches the browser"). A
  held topic does not linger away, and what it publishes meanwhile is
  delivered at `join`.
- Drain: streams end in jittered waves, so clients do not return at once; the
  drain is done after the last wave or as soon as no subscriber is left.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections.abc import Callable

from ..config import LimitsConfig
from ..errors import ClientLimit, RateLimited, TopicLimit
from ..metrics import Metrics
from ..timing import Clock, Timer
from . import ids
from .resume import Record
from .route import Target
from .topic import Subscriber, Topic, Upstreams

log = logging.getLogger(__name__)

# How many seconds' worth of topic opens one client may make at once: a page
# opening a dashboard's handful of topics, or reopening them on reload, passes.
OPEN_BURST_SECONDS = 2.0
# The per-client open-rate table is swept of idle clients when it reaches this
# size (and then twice its live size), so the sweep costs O(1) per open.
OPEN_TABLE_SWEEP_MIN = 1024


class Hub:
    """All topics of one process."""

    def __init__(
        self,
        upstreams: Upstreams,
        clock: Clock,
        metrics: Metrics,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.upstreams = upstreams
        # Replaced on reload; None (no per-client open limits) until the app hands it over.
        self._limits = limits
        self._topics: dict[str, Topic] = {}
        self._route_topics: dict[str, int] = {}
        self._lingering: dict[Topic, Timer] = {}
        # Topics held by clients that have not joined yet (`open`) -> how many such clients.
        self._holds: dict[Topic, int] = {}
        self._records: dict[str, Record] = {}
        # Shared topics whose opener no other client has joined yet -> that opener, and how
        # many such topics each (client, route) holds. Both only hold open topics.
        self._opened_by: dict[Topic, str] = {}
        self._solo: dict[tuple[str, str], int] = {}
        # Per client: when its open bucket is full again (GCRA's theoretical arrival time).
        self._open_tat: dict[str, float] = {}
        self._sweep_at = OPEN_TABLE_SWEEP_MIN
        self._subscribers = 0
        self._drains: list[asyncio.Event] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def limits(self) -> LimitsConfig | None:
        return self._limits

    @limits.setter
    def limits(self, limits: LimitsConfig | None) -> None:
        """A reload: open topics send ids the door's new limit takes back, too."""
        self._limits = limits
        for topic in self._topics.values():
            topic.max_id_bytes = self._max_id_bytes()

    def _max_id_bytes(self) -> int:
        return self._limits.max_last_event_id_bytes if self._limits else ids.DEFAULT_MAX_ID_BYTES

    @property
    def topics(self) -> dict[str, Topic]:
        return self._topics

    def is_closing(self) -> bool:
        """True once `close()` began; new subscribers are refused from then on."""
        return self._closing

    def admit(self, target: Target, *, client: str | None = None) -> None:
        """Raise if subscribing `client` to `target` would open a topic it may not open.

        TopicLimit (503): the route holds its maximum of topics. RateLimited (429): the client
        opens topics too fast. ClientLimit (429): the client holds its share of the route's
        topics that nobody else joined (`max_topic_share_per_client`). Joining an open topic
        is never refused. Checked before a response starts, so a refusal is a clean status;
        `subscribe` checks again.
        """
        if target.topic_key in self._topics:
            return
        route = target.route
        if self._route_topics.get(route.name, 0) >= route.max_topics:
            raise TopicLimit(
                f"route {route.name!r} has its maximum of {route.max_topics} topics open",
                headers={"Retry-After": "5"},
            )
        if client is None or route.mode == "direct":
            return
        share = self.limits.max_topic_share_per_client if self.limits else 1.0
        if share < 1.0 and self._solo.get((client, route.name), 0) >= math.ceil(
            route.max_topics * share
        ):
            wait = max(1, math.ceil(route.linger_seconds))
            raise ClientLimit(
                f"this address holds its share of route {route.name!r}'s topics",
                headers={"Retry-After": str(wait)},
            )
        wait_seconds = self._open_wait(client)
        if wait_seconds > 0:
            raise RateLimited(
                "new topics are opened too fast from this address; retry shortly",
                headers={"Retry-After": str(max(1, math.ceil(wait_seconds)))},
            )

    def subscribe(
        self,
        target: Target,
        sub: Subscriber,
        last_event_id: str | None = None,
        *,
        client: str | None = None,
    ) -> Topic:
        """Add `sub` to the target's topic (opening it if new), resuming after `last_event_id`.

        `client` (the client's address) is who opens or joins; None skips per-client limits.
        """
        topic = self.open(target, client=client)
        self.join(topic, sub, last_event_id)
        return topic

    def open(self, target: Target, *, client: str | None = None) -> Topic:
        """The target's topic, opened if new, held for a client that will `join` or `let_go`.

        Raises like `admit`. Synchronous, so concurrent first clients open one upstream.
        """
        if self._closing:
            raise RuntimeError("hub is closing")
        self.admit(target, client=client)
        topic = self._topics.get(target.topic_key)
        if topic is None:
            route = target.route
            rm = self.metrics.route(route.name)
            # What its backend does with Last-Event-ID, learnt by any topic on the same one.
            record = self._records.setdefault(route.upstream, Record())
            topic = Topic(
                target,
                rm,
                self.clock,
                self.upstreams,
                self._failed,
                self._max_id_bytes(),
                record,
            )
            self._topics[target.topic_key] = topic
            self._route_topics[route.name] = self._route_topics.get(route.name, 0) + 1
            rm.topics.inc()
            if client is not None and route.mode != "direct":
                self._take_open(client)
                self._opened_by[topic] = client
                solo = (client, route.name)
                self._solo[solo] = self._solo.get(solo, 0) + 1
            topic.start()
        else:
            linger = self._lingering.pop(topic, None)
            if linger is not None:
                linger.cancel()
            opener = self._opened_by.get(topic)
            if opener is not None and client is not None and client != opener:
                self._unsolo(topic, opener)  # someone else wants it too: no longer one's own
        self._holds[topic] = self._holds.get(topic, 0) + 1
        return topic

    def join(
        self,
        topic: Topic,
        sub: Subscriber,
        last_event_id: str | None = None,
        since: int | None = None,
    ) -> None:
        """Subscribe `sub` to the topic it holds (`open`), after what it missed since ring
        position `since` (or since `last_event_id`).

        A topic that ended meanwhile (its upstream's final answer, a direct upstream's end)
        hands `sub` what it published since `since`, then ends `sub` as it ended the others.
        """
        self._release(topic)
        if self._topics.get(topic.key) is not topic:
            if since is not None and since < topic.ring.next_seq:
                parts = topic.missed(since)
                sub.replay(sub.framing(b"".join(parts)), len(parts))
            sub.close("normal")
            return
        topic.metrics.subscribers.inc()
        topic.add(sub, last_event_id, since)
        self._subscribers += 1

    def let_go(self, topic: Topic) -> None:
        """The client holding `topic` will not join (refused, gone): it may linger away."""
        self._release(topic)
        self._idle(topic)

    def _release(self, topic: Topic) -> None:
        held = self._holds[topic] - 1
        if held:
            self._holds[topic] = held
        else:
            del self._holds[topic]

    def unsubscribe(self, topic: Topic, sub: Subscriber) -> tuple[int, int]:
        """Remove `sub`; the last one out starts the topic's linger timer.

        Returns the (events, bytes) the topic handed `sub` live, for its access log line.
        """
        handed = topic.remove(sub)
        if handed is None:
            return (0, 0)
        topic.metrics.subscribers.dec()
        self._subscribers -= 1
        if not self._subscribers and self._drains:
            for done in self._drains:
                done.set()  # the drain's work is done before its window is
            self._drains.clear()
        self._idle(topic)
        return handed

    def _idle(self, topic: Topic) -> None:
        """Start the linger of a topic nobody is in or about to join."""
        if (
            topic.subscribers
            or topic in self._holds
            or topic in self._lingering
            or self._topics.get(topic.key) is not topic
        ):
            return
        route = topic.target.route
        # A direct topic is one client's own upstream request: nobody else can reuse it.
        linger = 0.0 if route.mode == "direct" else route.linger_seconds
        self._lingering[topic] = self.clock.call_later(linger, lambda: self._expire(topic))

    def _expire(self, topic: Topic) -> None:
        self._lingering.pop(topic, None)
        if (
            not topic.subscribers
            and topic not in self._holds
            and self._topics.get(topic.key) is topic
        ):
            self._close_topic(topic, "normal")

    def _failed(self, topic: Topic, outcome: str) -> None:
        self._close_topic(topic, outcome)

    def _close_topic(self, topic: Topic, outcome: str) -> None:
        if self._topics.get(topic.key) is topic:
            del self._topics[topic.key]
            self._route_topics[topic.target.route.name] -= 1
            topic.metrics.topics.dec()
        linger = self._lingering.pop(topic, None)
        if linger is not None:
            linger.cancel()
        opener = self._opened_by.get(topic)
        if opener is not None:
            self._unsolo(topic, opener)
        for sub in list(topic.subscribers):
            sub.close(outcome)
        task = asyncio.create_task(topic.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    # --- per-client topic opens ---------------------------------------------------------

    def _unsolo(self, topic: Topic, opener: str) -> None:
        del self._opened_by[topic]
        key = (opener, topic.target.route.name)
        remaining = self._solo[key] - 1
        if remaining:
            self._solo[key] = remaining
        else:
            del self._solo[key]  # the map holds only clients with such topics open

    def _open_rate(self) -> float:
        return self.limits.topic_opens_per_client_per_second if self.limits else 0.0

    def _open_wait(self, client: str) -> float:
        """Seconds until `client` may open a topic (0: now). GCRA, a token bucket in one float."""
        rate = self._open_rate()
        if not rate:
            return 0.0
        now = self.clock.now()
        tat = max(self._open_tat.get(client, now), now)
        tolerance = (max(1.0, rate * OPEN_BURST_SECONDS) - 1.0) / rate
        return max(0.0, tat - now - tolerance)

    def _take_open(self, client: str) -> None:
        rate = self._open_rate()
        if not rate:
            return
        now = self.clock.now()
        table = self._open_tat
        table[client] = max(table.get(client, now), now) + 1.0 / rate
        if len(table) >= self._sweep_at:
            # A client whose bucket is full again needs no entry: it starts afresh.
            for idle in [c for c, tat in table.items() if tat <= now]:
                del table[idle]
            self._sweep_at = max(OPEN_TABLE_SWEEP_MIN, 2 * len(table))

    # --- reload and shutdown --------------------------------------------------------------

    def close_route_topics(self, keep: Callable[[Target], bool], outcome: str) -> int:
        """End every topic whose target `keep` rejects (a reload changed its route)."""
        closing = [t for t in self._topics.values() if not keep(t.target)]
        for topic in closing:
            self._close_topic(topic, outcome)
        return len(closing)

    def drain(self, window_seconds: float, waves: int = 20) -> asyncio.Event:
        """End every stream over `window_seconds`, in jittered waves of random subscribers.

        Scheduled at once; the returned event is set after the last wave, or as soon as no
        subscriber is left (clients that left early end a drain early).

        So a rolling deploy does not send every client back in the same instant: each
        one's stream ends at a different moment (with its retry hint), and they return
        spread over the window plus their retry range.
        """
        done = asyncio.Event()
        subs = [s for t in self._topics.values() for s in t.subscribers]
        if not subs or window_seconds <= 0:
            done.set()
            return done
        self._drains.append(done)
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
                if done in self._drains:
                    self._drains.remove(done)

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

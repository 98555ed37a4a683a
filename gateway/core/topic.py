"""A topic: one upstream subscription, its replay ring and the subscribers sharing it.

Invariants (DESIGN.md, "The data path"):
- One parse, one encode. An upstream batch is encoded once, framed once per
  framing in use (chunked or not), and the same bytes object is handed to
  every subscriber of that framing.
- Nobody waits for the slowest. `publish()` never awaits; a subscriber's
  `send()` is a non-blocking write that reports whether the subscriber is
  still there. Enforcing its unsent-bytes limit is the subscriber's job.
- Whole events only: a batch is written as one unit, so a subscriber joining
  between two publishes starts at an event boundary and a heartbeat written
  between two publishes can never land inside an event.
- Resume without gap or duplicate: a subscriber arriving with a Last-Event-ID
  gets the ring after that id and joins the live group in the same
  synchronous step. An id the ring does not hold is the resumer's
  (`resume.py`): shared catch-ups from the upstream, or an in-band `gap`.
- No client input steers the shared stream: a topic's own upstream always
  opens live. Clients reconnecting after a gateway restart share catch-ups
  instead, so a junk or hours-old id costs one bounded request, never the
  topic.
- What the gateway sends, it accepts back: an upstream id a client could not
  send back as Last-Event-ID is replaced by a gateway id (`ids.py`) before
  it is encoded, the same way live and in a catch-up, so the two still meet.
- Subscriber <-> topic is many-to-many: a subscriber records the topics it is
  in (`topics`), so one stream can later follow several.

- The upstream runner never takes a shared topic down: if it raises or
  returns (a bug: it retries by itself until cancelled), it is restarted
  after a backoff, counted and logged, and the subscribers stay connected.

The hub (which owns topics) drives a topic through `start`, `add`, `remove`
and `stop`, and is reached only through the clock, the upstreams and the
`on_failed` callback it hands a topic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ..metrics import RouteMetrics
from ..sse import EncodeError, Event, encode, encode_retry
from ..timing import Backoff, Clock
from . import ids
from .answer import STREAM, Answer
from .catchup import CatchUp
from .resume import Record, Resumer, gap_event
from .ring import Ring, RingLimits
from .route import Target

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

    def replay(self, data: bytes, events: int) -> bool:
        """Like send, for a replay of `events` events: its size must not count against the
        backlog limit."""
        ...

    def close(self, outcome: str) -> None:
        """End the subscriber's stream (idempotent)."""
        ...


class UpstreamSink(Protocol):
    """What an upstream reports into: the topic it feeds."""

    def publish(self, events: Sequence[Event]) -> None: ...

    def set_state(self, state: str) -> None:
        """The upstream connection's state: connecting, connected or backoff."""
        ...

    def dropped(self, reason: str, count: int = 1) -> None: ...


class TopicSink(UpstreamSink, Protocol):
    """What a topic's own upstream (not a catch-up) reports besides events."""

    def answered(self, answer: Answer) -> None:
        """How the upstream answered an attempt, before any of its events."""
        ...

    def retry(self, ms: int) -> None:
        """The upstream sent `retry: ms` (reported by direct topics, whose client it is for)."""
        ...


class Upstreams(Protocol):
    """How the hub reaches upstreams; injected by the composition root, so no aiohttp here."""

    async def stream(self, target: Target, sink: TopicSink) -> None:
        """Run the topic's upstream (live, then resuming by itself) until cancelled, or until
        a final answer (`answer.py`), after which the topic ends."""
        ...

    async def catch_up(self, target: Target, sink: UpstreamSink, last_event_id: str) -> None:
        """One request for the events after `last_event_id`; returns at its end or raises."""
        ...


class Topic:
    """One upstream subscription, its replay ring and the subscribers that share it."""

    __slots__ = (
        "_answered",
        "_bytes_out",
        "_clock",
        "_events_out",
        "_gap_next",
        "_groups",
        "_live_id",
        "_live_since",
        "_on_failed",
        "_resumer",
        "_snapshot",
        "_streamed",
        "_upstream",
        "_upstreams",
        "answer",
        "key",
        "last_publish",
        "max_id_bytes",
        "metrics",
        "ring",
        "state",
        "subscribers",
        "target",
    )

    def __init__(
        self,
        target: Target,
        metrics: RouteMetrics,
        clock: Clock,
        upstreams: Upstreams,
        on_failed: Callable[[Topic, str], None],
        max_id_bytes: int = ids.DEFAULT_MAX_ID_BYTES,
        record: Record | None = None,
    ) -> None:
        route = target.route
        self._clock = clock
        self._upstreams = upstreams
        # Called when the upstream runner ends, which it never should: the owner closes us.
        self._on_failed = on_failed
        self.target = target
        self.key = target.topic_key
        self.metrics = metrics
        self.ring = Ring(RingLimits(route.ring_events, route.ring_bytes, route.ring_seconds))
        # Every subscriber of the topic; the live ones are also in a framing group, the
        # ones waiting for a catch-up are the resumer's until they go live.
        self.subscribers: dict[Subscriber, None] = {}
        self._groups: dict[Framing, dict[Subscriber, None]] = {}
        # Rebuilt only when membership changes, so publish iterates plain tuples.
        self._snapshot: tuple[tuple[Framing, tuple[Subscriber, ...]], ...] | None = None
        # The longest id a client may send back (`[limits] max_last_event_id_bytes`).
        self.max_id_bytes = max_id_bytes
        self._resumer: Resumer[Subscriber] = Resumer(self, clock, record)
        # What every live subscriber was handed, counted once per batch: a subscriber's own
        # share is the difference since it went live (for its access log line).
        self._events_out = 0
        self._bytes_out: dict[Framing, int] = {}
        self._live_since: dict[Subscriber, tuple[int, int]] = {}
        self._upstream: asyncio.Task[None] | None = None
        self.state = "connecting"
        metrics.upstream_states["connecting"].inc()
        self.last_publish = clock.now()
        # The last id this topic's own runner published: where a restarted runner resumes.
        self._live_id: str | None = None
        # Whether the upstream ever streamed, and a gap owed in front of the next batch (its
        # reason) when it came back unable to resume.
        self._streamed = False
        self._gap_next: str | None = None
        # The upstream's first answer (or a final one), which a client arriving before it waits
        # for (`wait_answer`); set when the topic stops, so nobody waits on a closed topic.
        self.answer: Answer | None = None
        self._answered = asyncio.Event()

    # --- UpstreamSink ---------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        started = time.perf_counter()
        self.metrics.events_received.inc(len(events))
        now = self._clock.now()
        ring = self.ring
        parts: list[bytes] = []
        batch: list[tuple[str | None, bytes]] = []
        live_id = self._live_id
        gap_reason = self._gap_next
        for event in events:
            if event.id is not None:
                live_id = event.id or None  # "" is the upstream resetting its id
            try:
                event_id, data = self.encode(event)
            except EncodeError:
                self.dropped("invalid")
                continue
            if gap_reason is not None and not parts:
                # Where the stream broke, in front of its first event since: in the ring
                # too, so a replay across it says so.
                self._gap_next = None
                gap = gap_event(ring.newest_id or "", gap_reason)
                parts.append(gap)
                ring.append(None, gap, now)
            parts.append(data)
            batch.append((event_id, data))
            ring.append(event_id, data, now)
        self._live_id = live_id
        if not parts:
            return
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        self.last_publish = now
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple((f, tuple(g)) for f, g in self._groups.items())
        reached = 0
        refused = 0
        written = 0
        self._events_out += len(parts)
        bytes_out = self._bytes_out
        for framing, group in snapshot:
            data = framing(raw)
            bytes_out[framing] = bytes_out.get(framing, 0) + len(data)
            group_reached = 0
            for sub in group:
                if sub.send(data):
                    group_reached += 1
            reached += group_reached
            refused += len(group) - group_reached
            written += len(data) * group_reached
        # Counted once per batch (N at a time), never once per subscriber.
        metrics = self.metrics
        metrics.delivery_seconds.observe(time.perf_counter() - started)
        if reached:
            metrics.events_delivered.inc(len(parts) * reached)
            metrics.bytes_written.inc(written)
        if refused:
            metrics.dropped["slow"].inc(len(parts) * refused)
        if gap_reason is not None and self._gap_next is None:
            metrics.gaps[gap_reason].inc(reached)
            log.warning(
                "upstream of %s came back unable to resume: %d subscribers got a gap event",
                self.key,
                reached,
            )
        if self._resumer.busy:
            self._resumer.published(batch)

    def encode(self, event: Event) -> tuple[str | None, bytes]:
        """The id this topic sends for `event` and its wire bytes; raises EncodeError."""
        event_id = event.id
        if event_id:
            wire = ids.wire_id(event_id, self.max_id_bytes)
            if wire is not event_id:
                event_id = wire
                event = dataclasses.replace(event, id=wire)
        return event_id, encode(event)

    def set_state(self, state: str) -> None:
        if state != self.state:
            states = self.metrics.upstream_states
            states[self.state].dec()
            states[state].inc()
            self.state = state
            if state != "connected":
                self._resumer.topic_down()
            else:
                if self.answer is None:
                    self.answered(STREAM)  # an upstream that reports no answer (a test double)
                # A stream that has delivered something and comes back unable to go on where
                # it stopped: what was published meanwhile is lost. (Before its first event
                # there is nothing for a subscriber to be behind of.)
                if self._streamed and self.ring.next_seq and not self._resumes_stream():
                    self._gap_next = "upstream_reconnected"
                self._streamed = True
                self._resumer.unpark()  # catch-ups wait for the topic's own stream

    def _resumes_stream(self) -> bool:
        """Whether the upstream, reconnected, went on where it stopped: with an id to resume
        from, on a route that resumes, and not seen ignoring Last-Event-ID. (A direct topic's
        reconnect is its client's, with the client's own id.)"""
        return self.target.route.mode == "direct" or (
            self._live_id is not None
            and self.target.route.upstream_resume
            and self._resumer.upstream_resumes is not False
        )

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def dropped(self, reason: str, count: int = 1) -> None:
        self.metrics.dropped[reason].inc(count)

    # --- TopicSink: what reaches the browser (answer.py) ------------------------------

    def answered(self, answer: Answer) -> None:
        if self.answer is None or answer.final:
            self.answer = answer
            self._answered.set()

    async def wait_answer(self) -> Answer | None:
        """The upstream's first answer; None if the topic stopped before one came."""
        await self._answered.wait()
        return self.answer

    def retry(self, ms: int) -> None:
        # Kept in the ring too, so a client that joins after it was read (its response head
        # still on the way) gets it with what it missed.
        data = encode_retry(ms)
        self.ring.append(None, data, self._clock.now())
        for framing, group in self._groups.items():
            framed = framing(data)
            for sub in group:
                sub.send(framed)

    # --- joining -----------------------------------------------------------------

    def _join_live(self, sub: Subscriber) -> None:
        self._groups.setdefault(sub.framing, {})[sub] = None
        self._snapshot = None
        self._live_since[sub] = (self._events_out, self._bytes_out.get(sub.framing, 0))

    def deliver(self, sub: Subscriber, parts: list[bytes], events: int) -> None:
        """Write what `sub` missed in one go, then make it live, with no await in between."""
        if sub not in self.subscribers:
            return  # it left meanwhile (a write that failed, say)
        if parts:
            sub.replay(sub.framing(b"".join(parts)), len(parts))
            self.metrics.replayed_events.inc(events)
        self._join_live(sub)

    def start_catchup(self, catchup: CatchUp) -> None:
        target, upstreams = self.target, self._upstreams
        last_event_id = catchup.last_event_id
        catchup.start(
            lambda c: upstreams.catch_up(target, c, last_event_id),
            target.route.catchup_timeout_seconds,
        )

    @property
    def upstream_resumes(self) -> bool | None:
        """What this topic's upstream was seen to do with Last-Event-ID (None: not yet seen)."""
        return self._resumer.upstream_resumes

    # --- membership -------------------------------------------------------------

    def add(self, sub: Subscriber, last_event_id: str | None, since: int | None = None) -> None:
        """Join `sub`, after replaying what it missed since `last_event_id` (if any), or else
        what the topic published from ring position `since` on (while its response head
        was written)."""
        self.subscribers[sub] = None
        sub.topics.append(self)
        if last_event_id:
            self._resumer.resume(sub, last_event_id)
        elif since is not None and since < self.ring.next_seq:
            self.deliver(sub, self.missed(since), 0)
        else:
            self._join_live(sub)

    def missed(self, since: int) -> list[bytes]:
        """What the topic published from ring position `since` on, with a gap in front if
        the ring no longer holds all of it."""
        parts = self.ring.since(since)
        if since < self.ring.front:
            parts.insert(0, gap_event("", "ring_evicted"))
            self.metrics.gaps["ring_evicted"].inc()
        return parts

    def remove(self, sub: Subscriber) -> tuple[int, int] | None:
        """Remove `sub`; None if it was not here, else the (events, bytes) it was handed live."""
        if sub not in self.subscribers:
            return None
        del self.subscribers[sub]
        now_out = (self._events_out, self._bytes_out.get(sub.framing, 0))
        events0, bytes0 = self._live_since.pop(sub, now_out)  # never live: nothing handed
        handed = (now_out[0] - events0, now_out[1] - bytes0)
        group = self._groups.get(sub.framing)
        if group is not None and sub in group:
            del group[sub]
            if not group:
                del self._groups[sub.framing]
            self._snapshot = None
        self._resumer.forget(sub)
        if self in sub.topics:
            sub.topics.remove(self)
        return handed

    def start(self) -> None:
        """Open the upstream: a task that runs until `stop()`."""
        self._upstream = asyncio.create_task(self._run_upstream(), name=f"upstream {self.key}")

    async def _run_upstream(self) -> None:
        route = self.target.route
        backoff = Backoff(route.reconnect_initial_seconds, route.reconnect_max_seconds)
        while True:
            started = self._clock.now()
            try:
                await self._upstreams.stream(self._resume_target(), self)
            except asyncio.CancelledError:
                raise
            except Exception:
                if route.mode == "direct":
                    # One client's own request: its stream ends and the client resumes with
                    # its own Last-Event-ID, which a restart here could not honour.
                    log.exception("direct upstream runner for %s crashed", self.key)
                    self._on_failed(self, "error")
                    return
                log.exception("upstream runner for %s crashed; restarting it", self.key)
            else:
                if route.mode == "direct" or (self.answer is not None and self.answer.final):
                    # Its upstream ended (direct), or said stop for good (a final answer): so
                    # do the clients' streams; those who come back meet the next answer.
                    self._on_failed(self, "normal")
                    return
                log.error("upstream runner for %s returned; restarting it", self.key)
            # A shared runner retries by itself until cancelled; reaching here is a bug. Contain
            # it without cutting anyone: the subscribers stay, the runner comes back.
            self.metrics.upstream_runner_restarts.inc()
            self.set_state("backoff")
            if self._clock.now() - started >= route.reconnect_max_seconds:
                backoff.reset()  # it had been running fine: not a crash loop
            await self._clock.sleep(backoff.next_delay())

    def _resume_target(self) -> Target:
        """The target a (re)started runner opens: after the last id its runner published.

        Only ids the topic's own runner handed to `publish` count (never the ring's, which a
        catch-up's bridge can anchor at a client's Last-Event-ID): no client steers the
        shared upstream. A restarted runner resumes where the crashed one stopped instead of
        silently skipping what was sent in between; the first start opens live, and so does
        a restart after the upstream reset its id (`id:` with no value).
        """
        live_id = self._live_id
        if live_id is None or self.target.route.mode == "direct":
            return self.target
        return dataclasses.replace(self.target, client_headers=(("Last-Event-ID", live_id),))

    async def stop(self) -> None:
        """Close the upstream and every catch-up; the subscribers are the owner's to end."""
        self._answered.set()  # a client waiting for an answer stops waiting
        # Ended with the topic: no splice, no gap.
        tasks = [c.task for c in self._resumer.close() if c.task is not None]
        task, self._upstream = self._upstream, None
        if task is not None:
            tasks.append(task)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.state:
            self.metrics.upstream_states[self.state].dec()
            self.state = ""  # stopped: counted in no state

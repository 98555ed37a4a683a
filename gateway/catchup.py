"""Catch-up: fetch from the upstream what a topic's ring no longer (or not yet) holds.

A subscriber whose Last-Event-ID is not in the ring waits while one upstream
request, shared by every subscriber asking for the same id of the same
topic, replays the upstream's history after that id. The catch-up buffers
those events until one of them is also in the topic's ring (the topic's own
upstream is the authority from that point on), either as it arrives or when
the topic publishes it. It then *splices*: each waiter gets the buffered
events up to and including that one, then the ring after it, then joins the
live stream, with no await in between, so nothing is missed or repeated.

If the catch-up cannot reach the ring (the upstream refuses, the stream
ends, the timeout passes, or the buffer would outgrow the ring's bounds),
its waiters get what was fetched, then an in-band `gap` event, then live
events: a gap is reported, never silent. The buffer is bounded by the
route's `catchup_max_bytes`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from .ring import Ring
from .sse import EncodeError, Event, encode
from .timing import Clock, Timer

log = logging.getLogger(__name__)

# Reasons a catch-up ends without splicing; also the `reason` of the gap event.
FAILURES = ("catch_up_failed", "catch_up_ended", "catch_up_timeout", "catch_up_overflow")


class CatchUp:
    """One shared upstream catch-up for (topic, last event id)."""

    __slots__ = (
        "_buffer",
        "_buffer_bytes",
        "_clock",
        "_ids",
        "_limit_bytes",
        "_on_done",
        "_ring",
        "_timer",
        "done",
        "last_event_id",
        "task",
    )

    def __init__(
        self,
        last_event_id: str,
        ring: Ring,
        clock: Clock,
        limit_bytes: int,
        on_done: Callable[[CatchUp, list[bytes], str | None, str], None],
    ) -> None:
        self.last_event_id = last_event_id
        self._ring = ring
        self._clock = clock
        self._limit_bytes = limit_bytes
        # on_done(catch-up, prefix bytes, splice id or None, reason)
        self._on_done = on_done
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._ids: dict[str, int] = {}
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._timer: Timer | None = None

    # --- the sink the upstream's catch-up request feeds ---------------------------

    def publish(self, events: Sequence[Event]) -> None:
        now = self._clock.now()
        for event in events:
            if self.done:
                return
            try:
                data = encode(event)
            except EncodeError:
                continue
            self._buffer.append(data)
            self._buffer_bytes += len(data)
            if event.id:
                self._ids.setdefault(event.id, len(self._buffer) - 1)
                if self._ring.has(event.id, now):
                    self._splice(event.id)
                    return
            if self._buffer_bytes > self._limit_bytes:
                self.fail("catch_up_overflow")
                return

    def set_connected(self, connected: bool) -> None:
        """Part of the sink interface; a catch-up's connection state is not tracked."""

    def dropped(self, reason: str, count: int = 1) -> None:
        """Part of the sink interface; oversize events in a catch-up are simply skipped."""

    # --- driven by the topic -------------------------------------------------------

    def topic_published(self, ids: Sequence[str]) -> None:
        """The topic's upstream delivered these ids: splice if one is already buffered."""
        for event_id in ids:
            if event_id in self._ids:
                self._splice(event_id)
                return

    def _splice(self, event_id: str) -> None:
        index = self._ids[event_id]
        self._finish(self._buffer[: index + 1], event_id, "spliced")

    def fail(self, reason: str) -> None:
        self._finish(self._buffer, None, reason)

    def _finish(self, prefix: list[bytes], splice_id: str | None, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._buffer = []
        self._ids = {}
        if self._timer is not None:
            self._timer.cancel()
        # Also when called from inside the request's own read loop: it stops at its next await.
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._on_done(self, prefix, splice_id, reason)

    def start(self, request: Callable[[CatchUp], Awaitable[None]], timeout_seconds: float) -> None:
        self.task = asyncio.create_task(self._run(request), name="catch-up")
        self._timer = self._clock.call_later(timeout_seconds, lambda: self.fail("catch_up_timeout"))

    async def _run(self, request: Callable[[CatchUp], Awaitable[None]]) -> None:
        """Drive the upstream request; any ending that did not splice is a failure."""
        try:
            await request(self)
            reason = "catch_up_ended"
        except asyncio.CancelledError:
            if self.done:
                return
            raise
        except Exception as exc:
            log.warning("catch-up after %r failed: %s", self.last_event_id[:64], exc)
            reason = "catch_up_failed"
        self.fail(reason)

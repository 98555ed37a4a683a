"""Catch-up: one upstream request for what a topic's ring does not hold.

A catch-up asks the upstream for the events after one Last-Event-ID and
buffers them (as the wire bytes the topic would send: same encoding, same
id replacement) until they *meet* the topic: the first buffered id the ring
holds, either as the catch-up's event arrives or when the topic publishes an
id the catch-up has already buffered. The topic's own upstream stays live and
is the authority. Who waits on a catch-up, and what each waiter gets, is the
resumer's (`resume.py`); a catch-up only says where it met, or why it ended.

On a topic that has carried no id yet (just opened after a gateway restart,
say) there may be nothing to meet. So when the catch-up stream has been
silent for `QUIET_SECONDS`, the topic's upstream is connected, and the topic
has published nothing since the catch-up began and holds no id, the history
is *complete*.

Otherwise it ends in failure, and its waiters get a `gap`: when the upstream
refuses, the stream ends, `timeout` passes (counted only while the topic's
upstream is connected, since a topic that is down cannot be met), or the
buffer outgrows `catchup_max_bytes`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..sse import EncodeError, Event
from ..timing import Clock, Timer
from .ring import Ring

log = logging.getLogger(__name__)

# Silence on the catch-up stream that, with a live topic that has published
# nothing meanwhile, means its history is complete. An upstream sends its
# backlog as fast as it can; a second of silence is far past that.
QUIET_SECONDS = 1.0


class Owner(Protocol):
    """The topic, as a catch-up sees it."""

    ring: Ring

    def encode(self, event: Event) -> tuple[str | None, bytes]:
        """The (id, wire bytes) the topic would send for `event`; raises EncodeError."""
        ...

    def catchup_buffered(self, catchup: CatchUp, event_id: str) -> None:
        """`catchup` now holds `event_id`: a client waiting for that id can wait on it."""
        ...

    def catchup_may_finish(self, catchup: CatchUp) -> bool:
        """True when the topic is live and has published nothing since `catchup` began."""
        ...

    def catchup_may_time_out(self, catchup: CatchUp) -> bool:
        """False while the topic's own upstream is down: waiting on it is no catch-up fault."""
        ...

    def catchup_done(
        self,
        catchup: CatchUp,
        meet: int | None,
        reason: str,
        batch: Sequence[tuple[str | None, bytes]] = (),
    ) -> None:
        """`catchup` ended: spliced at `buffer[meet]`, or (meet None) complete or failed for
        `reason`. `batch`: the (id, bytes) being published when the topic met the catch-up,
        so the splice still finds what follows the meeting id if a tiny ring evicted it."""
        ...


class CatchUp:
    """One shared upstream catch-up for (topic, last event id)."""

    __slots__ = (
        "_buffer_bytes",
        "_clock",
        "_ids",
        "_limit_bytes",
        "_owner",
        "_quiet",
        "_timeout",
        "_timeout_seconds",
        "buffer",
        "done",
        "last_event_id",
        "outage",
        "started_seq",
        "task",
    )

    def __init__(self, owner: Owner, last_event_id: str, clock: Clock, limit_bytes: int) -> None:
        self._owner = owner
        self.last_event_id = last_event_id
        self._clock = clock
        self._limit_bytes = limit_bytes
        # What the upstream returned after `last_event_id`, in order: (id, wire bytes).
        self.buffer: list[tuple[str | None, bytes]] = []
        self._buffer_bytes = 0
        self._ids: dict[str, int] = {}
        self.started_seq = owner.ring.next_seq
        # Set when the topic's own stream dropped while this was in flight.
        self.outage = False
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._quiet: Timer | None = None
        self._timeout: Timer | None = None
        self._timeout_seconds = 0.0

    # --- the sink the upstream's catch-up request feeds ---------------------------

    def publish(self, events: Sequence[Event]) -> None:
        now = self._clock.now()
        owner = self._owner
        ring = owner.ring
        for event in events:
            if self.done:
                return
            try:
                event_id, data = owner.encode(event)
            except EncodeError:
                continue
            if not self.buffer and event_id == self.last_event_id:
                continue  # an upstream that replays from the id itself: the client has it
            self.buffer.append((event_id, data))
            self._buffer_bytes += len(data)
            if event_id:
                index = len(self.buffer) - 1
                if self._ids.setdefault(event_id, index) == index:
                    if ring.has(event_id, now):
                        self.splice(index)
                        return
                    owner.catchup_buffered(self, event_id)
            if self._buffer_bytes > self._limit_bytes:
                self.fail("catch_up_overflow")
                return
        self._arm_quiet()

    def set_state(self, state: str) -> None:
        """Part of the sink interface; a catch-up's connection state is not tracked."""

    def dropped(self, reason: str, count: int = 1) -> None:
        """Part of the sink interface; oversize events in a catch-up are simply skipped."""

    # --- driven by the topic -------------------------------------------------------

    def index(self, event_id: str) -> int | None:
        """Where `event_id` first is in the buffer, if it is."""
        return self._ids.get(event_id)

    def splice(self, index: int, batch: Sequence[tuple[str | None, bytes]] = ()) -> None:
        """Meet the ring at `buffer[index]`: the buffer up to it, then the ring after it.

        `batch` is the topic's batch being published when it met the catch-up, if that is how.
        """
        self._finish(index, "spliced", batch)

    def fail(self, reason: str) -> None:
        self._finish(None, reason)

    def cancel(self) -> None:
        """Nobody needs it any more (or the topic is closing): stop, and tell nobody."""
        self._stop()

    def start(self, request: Callable[[CatchUp], Awaitable[None]], timeout_seconds: float) -> None:
        self.task = asyncio.create_task(self._run(request), name="catch-up")
        self._timeout_seconds = timeout_seconds
        self._timeout = self._clock.call_later(timeout_seconds, self._on_timeout)
        self._arm_quiet()

    # --- internals -------------------------------------------------------------------

    def _arm_quiet(self) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
        self._quiet = self._clock.call_later(QUIET_SECONDS, self._on_quiet)

    def _on_quiet(self) -> None:
        self._quiet = None
        if self.done:
            return
        if self._owner.catchup_may_finish(self):
            self._finish(None, "complete")
        else:
            self._arm_quiet()

    def _on_timeout(self) -> None:
        self._timeout = None
        if self.done:
            return
        if self._owner.catchup_may_time_out(self):
            self.fail("catch_up_timeout")
        else:
            self._timeout = self._clock.call_later(self._timeout_seconds, self._on_timeout)

    def _stop(self) -> None:
        self.done = True
        for timer in (self._quiet, self._timeout):
            if timer is not None:
                timer.cancel()
        self._quiet = self._timeout = None
        # Also when called from inside the request's own read loop: it stops at its next await.
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _finish(
        self, meet: int | None, reason: str, batch: Sequence[tuple[str | None, bytes]] = ()
    ) -> None:
        if self.done:
            return
        self._stop()
        try:
            self._owner.catchup_done(self, meet, reason, batch)
        finally:
            self.buffer = []
            self._ids = {}

    async def _run(self, request: Callable[[CatchUp], Awaitable[None]]) -> None:
        """Drive the upstream request. Its end is not failure by itself: a catch-up that ended
        after the whole history may still meet the topic, or be complete on a quiet one."""
        try:
            await request(self)
        except asyncio.CancelledError:
            if self.done:
                return
            raise
        except Exception as exc:
            log.warning("catch-up after %r failed: %s", self.last_event_id[:64], exc)
            self.fail("catch_up_failed")

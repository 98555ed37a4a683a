"""Resuming a topic's clients: the ring, catch-ups, and what the upstream does with an id.

A client arriving with a Last-Event-ID gets every event after it exactly once,
or an in-band `gap` event exactly where history cannot reach, then everything
after it. Ids are opaque: order is learnt only from what the upstream returns.

- **The ring first.** An id the ring holds (or an anchor a catch-up left, see
  ring.py) is served from it in the same synchronous step that makes the
  client live.
- **One catch-up serves every id it contains.** A client whose id is a
  catch-up's starting id, or already in its buffer, waits on that catch-up
  and gets the buffer after its own id. A catch-up that meets the ring
  bridges it (its events go in front of the ring), so a later client holding
  any id it fetched is a ring hit.
- **Park, do not fan out.** While a catch-up is in flight, a client with an
  id nobody holds yet is *parked*: the catch-up may well fetch that id (a
  deploy sends clients back holding ids a few events apart, in any order).
  When a catch-up ends, parked clients are served from the ring it bridged,
  or the first of them starts the next one. A client parked for
  `PARK_SECONDS` with catch-ups still running starts its own (up to
  `max_catchups`), so a slow catch-up cannot hold everyone. N reconnects after
  a deploy cost about one request per id older than every id seen before it
  (a handful, in random order), not one per client or per distinct id.
- **No catch-up before the topic's own stream is up.** An upstream that
  ignores Last-Event-ID answers a catch-up with live events; started after
  the topic's own stream, its first event is one the topic has or will have,
  which is how ignoring is told from resuming (below).
- **Never silent.** A catch-up's answer is judged by its first event. One
  the topic never carried is history: the upstream resumed. One the topic
  carried right after an event other than the client's id proves the
  upstream ignored the header: those clients get `gap`
  (`upstream_ignored_resume`) and it is remembered (per upstream URL
  template, for every topic of that backend, past the topic's life), so
  later clients get the gap at once, with no request. One the topic carried
  with nothing known before it (the first event of the topic's own stream),
  or an empty answer on a quiet topic, cannot be told from a live answer:
  until this upstream has been seen resuming, the client gets `gap`
  (`resume_unconfirmed`), since a missed event is possible. (The ring keeps
  the ids it evicts while catch-ups run, so a small ring does not hide what
  the topic carried.)
- **A failed catch-up** (refused, broken, timed out, over its byte bound)
  delivers nothing of what it fetched: from an upstream that ignores the id
  it would not follow the client's id, and from one ahead of the topic's
  stream the client would get it again live. The gap is at the client's id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from ..metrics import RouteMetrics
from ..sse import Event, encode
from ..timing import Clock, Timer
from . import ids
from .catchup import CatchUp
from .ring import Ring
from .route import Target

log = logging.getLogger(__name__)

# How long a parked client waits for the catch-ups in flight before starting its own.
# A catch-up that will fetch its id has done so within milliseconds of the upstream's
# answer; one second covers a slow upstream's backlog without stalling anyone for long.
PARK_SECONDS = 1.0
# Different ids answered live, with no history answer between, that mark an upstream as one
# that ignores Last-Event-ID. One could be a junk or expired id; a deploy sends back tens of
# real ones, so three tell a backend that ignores the header quickly.
IGNORED_AFTER = 3
# While an upstream is taken to ignore Last-Event-ID, one catch-up this often still goes out,
# in case it was wrong (junk ids) or the backend changed: a history answer corrects it.
REPROBE_SECONDS = 60.0

S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)


def gap_event(last_event_id: str, reason: str) -> bytes:
    """The in-band notice that events after `last_event_id` cannot be delivered.

    It carries no id, so the client's lastEventId stays where it was.
    """
    data = json.dumps({"lastEventId": last_event_id, "reason": reason}, separators=(",", ":"))
    return encode(Event(data, event="gap"))


class Record:
    """What an upstream was seen to do with Last-Event-ID, shared by every topic of one
    upstream URL template (the hub keeps one per template: one backend's behaviour) and kept
    past a topic's life.

    `resumes`: None (not yet seen), True (it answered with history: proof, and final), False
    (it answered live to an id it must have had, or to `IGNORED_AFTER` different ids with no
    history answer between). False is re-checked: one catch-up every `REPROBE_SECONDS` still
    goes out, and a history answer makes it True. So junk ids from one client cost the others
    at most that long of gaps instead of requests, and never silence: every answer that does
    not show it follows the client's id is a gap.
    """

    __slots__ = ("live_answers", "probe_at", "resumes")

    def __init__(self) -> None:
        self.resumes: bool | None = None
        # Client ids answered live while `resumes` is None (at most IGNORED_AFTER).
        self.live_answers: set[str] = set()
        self.probe_at = 0.0


class Host(Protocol[S_contra]):
    """The topic, as the resumer sees it."""

    ring: Ring
    metrics: RouteMetrics
    target: Target

    @property
    def connected(self) -> bool: ...

    def encode(self, event: Event) -> tuple[str | None, bytes]: ...

    def deliver(self, sub: S_contra, parts: list[bytes], events: int) -> None:
        """Write `parts` (holding `events` replayed events) to `sub` in one go, then make it
        live, all before the next publish can run."""
        ...

    def start_catchup(self, catchup: CatchUp) -> None:
        """Send `catchup`'s upstream request."""
        ...


class Resumer(Generic[S]):
    """Serves a topic's resuming clients; the topic's `catchup.Owner`."""

    __slots__ = (
        "_catchups",
        "_clock",
        "_host",
        "_park_timer",
        "_parked",
        "_parked_on",
        "_record",
        "_waiting",
        "ring",
    )

    def __init__(self, host: Host[S], clock: Clock, record: Record | None = None) -> None:
        self._host = host
        self._clock = clock
        self.ring = host.ring
        self._catchups: dict[str, CatchUp] = {}
        # Clients waiting on a catch-up -> (that catch-up, the client's own id).
        self._waiting: dict[S, tuple[CatchUp, str]] = {}
        # Parked clients by id (in order of arrival) -> {client: when parked}.
        self._parked: dict[str, dict[S, float]] = {}
        self._parked_on: dict[S, str] = {}  # and back: each parked client's id
        self._park_timer: Timer | None = None
        self._record = record or Record()

    @property
    def upstream_resumes(self) -> bool | None:
        return self._record.resumes

    @property
    def busy(self) -> bool:
        return bool(self._catchups)

    # --- arrivals --------------------------------------------------------------------

    def resume(self, sub: S, last_event_id: str) -> None:
        host = self._host
        replay = self.ring.after(last_event_id, self._clock.now())
        if replay is not None:
            host.metrics.replays["hit"].inc()
            host.deliver(sub, replay, len(replay))
            return
        if not host.target.route.upstream_resume or ids.is_replacement(last_event_id):
            # A gateway id (ids.py) is not the upstream's: no request could answer it.
            self._gap(sub, [], last_event_id, "not_in_ring")
            return
        host.metrics.replays["catchup"].inc()
        self._wait(sub, last_event_id, self._clock.now())

    def _covering(self, event_id: str) -> CatchUp | None:
        catchup = self._catchups.get(event_id)
        if catchup is not None:
            return catchup
        return next((c for c in self._catchups.values() if c.index(event_id) is not None), None)

    def _may_start(self) -> bool:
        # The topic's own stream is up: a catch-up started now is answered after it, which is
        # what tells an upstream that ignores the id from one that resumes.
        return self._host.connected

    def _ignored(self) -> bool:
        """Taken to ignore Last-Event-ID, and not yet time to check again."""
        record = self._record
        if record.resumes is not False:
            return False
        now = self._clock.now()
        if now >= record.probe_at and not self._catchups:
            record.probe_at = now + REPROBE_SECONDS
            return False  # this one goes out: a history answer corrects the record
        return True

    def _wait(self, sub: S, last_event_id: str, since: float) -> None:
        replay = self.ring.after(last_event_id, self._clock.now())
        if replay is not None:  # the ring grew back to it meanwhile
            self._host.deliver(sub, replay, len(replay))
            return
        catchup = self._covering(last_event_id)
        if catchup is None and self._ignored():
            self._gap(sub, [], last_event_id, "upstream_ignored_resume")
            return
        if catchup is not None:
            self._waiting[sub] = (catchup, last_event_id)
        elif not self._catchups and self._may_start():
            self._start(sub, last_event_id)
        else:
            self._park(sub, last_event_id, since)
            if self._park_timer is None:
                self._park_timer = self._clock.call_later(PARK_SECONDS, self._on_park_timer)

    def _start(self, sub: S, last_event_id: str) -> None:
        route = self._host.target.route
        if len(self._catchups) >= route.max_catchups:
            self._gap(sub, [], last_event_id, "catch_up_limit")
            return
        self.ring.remember_evicted(True)
        catchup = CatchUp(self, last_event_id, self._clock, route.catchup_max_bytes)
        self._catchups[last_event_id] = catchup
        self._waiting[sub] = (catchup, last_event_id)
        self._host.metrics.catchup_requests.inc()
        self._host.start_catchup(catchup)

    def _park(self, sub: S, last_event_id: str, since: float) -> None:
        self._parked.setdefault(last_event_id, {})[sub] = since
        self._parked_on[sub] = last_event_id

    def _unpark_id(self, last_event_id: str) -> dict[S, float] | None:
        subs = self._parked.pop(last_event_id, None)
        if subs:
            for sub in subs:
                del self._parked_on[sub]
        return subs

    def _on_park_timer(self) -> None:
        self._park_timer = None
        self.unpark()

    def unpark(self) -> None:
        """Serve parked clients the ring now covers, attach those a catch-up holds, and start
        catch-ups for the rest (one at a time, or more once they have waited PARK_SECONDS)."""
        if not self._parked:
            return
        now = self._clock.now()
        route = self._host.target.route
        for last_event_id in list(self._parked):
            subs = self._unpark_id(last_event_id)
            if subs is None:  # left while others were being served
                continue
            replay = self.ring.after(last_event_id, now)
            for sub, since in subs.items():
                if replay is not None:
                    self._host.deliver(sub, replay, len(replay))
                elif self._covering(last_event_id) is not None or (
                    not self._catchups and self._may_start()
                ):
                    self._wait(sub, last_event_id, since)
                elif (
                    self._may_start()
                    and now - since >= PARK_SECONDS
                    and len(self._catchups) < route.max_catchups
                ):
                    self._start(sub, last_event_id)  # waited long enough: run alongside
                elif self._host.connected and now - since >= route.catchup_timeout_seconds:
                    self._gap(sub, [], last_event_id, "catch_up_limit")
                else:
                    self._park(sub, last_event_id, since)
        if self._parked and self._park_timer is None:
            self._park_timer = self._clock.call_later(PARK_SECONDS, self._on_park_timer)

    # --- catchup.Owner ---------------------------------------------------------------

    def encode(self, event: Event) -> tuple[str | None, bytes]:
        return self._host.encode(event)

    def catchup_buffered(self, catchup: CatchUp, event_id: str) -> None:
        subs = self._unpark_id(event_id) if self._parked else None
        if subs:
            for sub in subs:
                self._waiting[sub] = (catchup, event_id)

    def catchup_may_finish(self, catchup: CatchUp) -> bool:
        # Live, nothing published since the catch-up began, and no id in the ring that the
        # catch-up failed to meet (it would be behind, not complete).
        ring = self.ring
        return (
            self._host.connected and ring.next_seq == catchup.started_seq and ring.newest_id is None
        )

    def catchup_may_time_out(self, catchup: CatchUp) -> bool:
        return self._host.connected

    def catchup_done(
        self,
        catchup: CatchUp,
        meet: int | None,
        reason: str,
        batch: Sequence[tuple[str | None, bytes]] = (),
    ) -> None:
        from_id = catchup.last_event_id
        if self._catchups.get(from_id) is catchup:
            del self._catchups[from_id]
        waiters = [(s, i) for s, (c, i) in self._waiting.items() if c is catchup]
        for sub, _ in waiters:
            del self._waiting[sub]
        now = self._clock.now()
        ring = self.ring
        buffer = catchup.buffer
        rest: list[bytes] | None = None
        verdict: str | None = None
        end = len(buffer)
        if meet is not None:
            end = meet + 1
            meet_id = buffer[meet][0]
            assert meet_id is not None  # a catch-up meets the ring only at an id
            position = ring.position(meet_id, first=True)
            if position is not None:
                rest = ring.since(position)
            else:  # a tiny ring already evicted it: take the rest of the batch that met it
                ids = [event_id for event_id, _ in batch]
                if meet_id in ids:
                    rest = [data for _, data in batch[ids.index(meet_id) + 1 :]]
            if rest is None:
                reason = "ring_evicted"
            else:
                verdict = self._judge(catchup, buffer)
                if verdict is None and position is not None:
                    held, held_id = ring.entry_id(position - 1)
                    if held and held_id == meet_id:  # the ring has the meeting event itself
                        ring.bridge(from_id, buffer[:meet], position - 1, now)
                    else:  # only its position (an anchor): the catch-up has its bytes
                        ring.bridge(from_id, buffer[: meet + 1], position, now)
        elif reason == "complete":
            rest = []
            verdict = self._judge(catchup, buffer)
            if verdict is None and not len(ring):
                ring.bridge(from_id, buffer, ring.front, now)
        for sub, last_event_id in waiters:
            index = None if last_event_id == from_id else catchup.index(last_event_id)
            start = 0 if index is None else index + 1
            fetched = [data for _, data in buffer[start:end]]
            if rest is None:
                # Nothing of what was fetched: it may not follow the client's id (an upstream
                # that ignores it), or run ahead of the topic's stream, which the client now
                # joins (and would repeat). The gap is at the client's id.
                self._gap(sub, [], last_event_id, reason)
            elif verdict is not None and last_event_id == from_id:
                # Not shown to follow the client's id: say so, then everything from there.
                self._gap(sub, [], last_event_id, verdict, after=fetched + rest)
            elif start > end:
                # Its id lies past where the catch-up met the topic's stream, which has not
                # published it yet: wait again (on the ring, another catch-up, or a new one).
                self._wait(sub, last_event_id, now)
            else:
                self._host.deliver(sub, fetched + rest, len(fetched) + len(rest))
        if rest is not None:
            self._recheck()
        self.unpark()
        self._idle_check()

    def _idle_check(self) -> None:
        if not self._catchups:
            self.ring.remember_evicted(False)  # ghosts serve only catch-ups in flight

    def _judge(self, catchup: CatchUp, answer: Sequence[tuple[str | None, bytes]]) -> str | None:
        """None if the catch-up's `answer` follows its starting id, else the gap's reason.

        Told by its first event: one the topic never carried is history, so the upstream
        resumed; one the topic carried right after an event other than the client's id is a
        live answer (the upstream ignored the id, or did not know it); one the topic carried
        with nothing known before it (the first event of the topic's own stream), or an empty
        answer, cannot be told from a live answer. Learns what the upstream does with
        Last-Event-ID from what can be told apart (see `Record`).
        """
        trusted = None if self.upstream_resumes else "resume_unconfirmed"
        if not answer or not answer[0][0]:
            return trusted
        ring = self.ring
        seen, previous = ring.predecessor(answer[0][0])
        if seen == "unseen":
            since = ring.ghosts_since
            if not catchup.outage and since is not None and since <= catchup.started_seq:
                # History: the topic would remember the event had its own stream carried it
                # since the request (and the stream was up all along, so it would have).
                self._learn_resumes()
                return None
            return trusted
        if seen == "known":
            if previous == catchup.last_event_id:
                return None  # right after the client's id, as the topic carried it
            return self._live_answer(catchup.last_event_id)
        return trusted

    def _learn_resumes(self) -> None:
        record = self._record
        record.live_answers.clear()
        if record.resumes is not True:
            if record.resumes is False:
                log.info("the upstream of %s resumed after all", self._host.target.topic_key)
            record.resumes = True

    def _live_answer(self, last_event_id: str) -> str:
        """A catch-up answered `last_event_id` with live events: the gap's reason, after
        counting it as evidence that the upstream ignores Last-Event-ID."""
        record = self._record
        if record.resumes is None:
            record.live_answers.add(last_event_id)
            # An id the topic carried itself: the upstream had it, so it ignored it.
            if self.ring.carried(last_event_id) or len(record.live_answers) >= IGNORED_AFTER:
                record.resumes = False
                record.live_answers.clear()
                record.probe_at = self._clock.now() + REPROBE_SECONDS
                log.warning(
                    "the upstream of %s ignores Last-Event-ID: clients resuming beyond the ring "
                    "get a gap event (set the route's upstream_resume = false to skip the "
                    "request)",
                    self._host.target.topic_key,
                )
        return "upstream_ignored_resume" if record.resumes is False else "resume_unconfirmed"

    def _recheck(self) -> None:
        """The ring grew at its front: catch-ups holding ids it now has meet it there, and
        clients it now covers are served from it."""
        now = self._clock.now()
        ring = self.ring
        for catchup in list(self._catchups.values()):
            if catchup.done:
                continue
            meet = next(
                (
                    i
                    for i, (event_id, _) in enumerate(catchup.buffer)
                    if event_id and ring.has(event_id, now)
                ),
                None,
            )
            if meet is not None:
                catchup.splice(meet)
                continue
            for sub, (c, last_event_id) in list(self._waiting.items()):
                replay = ring.after(last_event_id, now) if c is catchup else None
                if replay is not None:
                    del self._waiting[sub]
                    self._host.deliver(sub, replay, len(replay))
            if not any(c is catchup for c, _ in self._waiting.values()):
                self._drop(catchup)

    def _drop(self, catchup: CatchUp) -> None:
        if self._catchups.get(catchup.last_event_id) is catchup:
            del self._catchups[catchup.last_event_id]
        catchup.cancel()
        self._idle_check()

    # --- leaving ---------------------------------------------------------------------

    def forget(self, sub: S) -> None:
        """`sub` left: a catch-up nobody waits for any more stops."""
        entry = self._waiting.pop(sub, None)
        if entry is not None:
            catchup = entry[0]
            if not any(c is catchup for c, _ in self._waiting.values()):
                self._drop(catchup)
                self.unpark()
            return
        last_event_id = self._parked_on.pop(sub, None)
        if last_event_id is not None:
            parked = self._parked[last_event_id]
            del parked[sub]
            if not parked:
                del self._parked[last_event_id]

    def close(self) -> list[CatchUp]:
        """The topic is closing: stop every catch-up and timer, tell nobody; returns the
        catch-ups, whose tasks the topic awaits."""
        catchups = list(self._catchups.values())
        for catchup in catchups:
            catchup.cancel()
        self._catchups.clear()
        self._waiting.clear()
        self._parked.clear()
        self._parked_on.clear()
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        return catchups

    # --- the topic's stream ----------------------------------------------------------

    def topic_down(self) -> None:
        """The topic's own stream dropped: what catch-ups in flight receive meanwhile is not
        evidence of history (the topic was not there to carry it)."""
        for catchup in self._catchups.values():
            catchup.outage = True

    def published(self, batch: Sequence[tuple[str | None, bytes]]) -> None:
        """The topic published `batch`: a catch-up holding one of its ids meets it there, and
        a client waiting for one of its ids (ahead of the topic) is served from the ring."""
        published = set()
        for event_id, _ in batch:
            if not event_id:
                continue
            published.add(event_id)
            for catchup in list(self._catchups.values()):
                index = catchup.index(event_id)
                if index is not None and not catchup.done:
                    catchup.splice(index, batch)
        if not published:
            return
        waiting = [(s, c, i) for s, (c, i) in self._waiting.items() if i in published]
        now = self._clock.now()
        for sub, catchup, last_event_id in waiting:
            replay = self.ring.after(last_event_id, now)
            if replay is not None and self._waiting.get(sub, (None,))[0] is catchup:
                del self._waiting[sub]
                self._host.deliver(sub, replay, len(replay))
                if not any(c is catchup for c, _ in self._waiting.values()):
                    self._drop(catchup)
        if any(i in published for i in self._parked):
            self.unpark()

    # --- gaps --------------------------------------------------------------------------

    def _gap(
        self,
        sub: S,
        before: list[bytes],
        last_event_id: str,
        reason: str,
        after: list[bytes] | None = None,
    ) -> None:
        after = after or []
        parts = [*before, gap_event(last_event_id, reason), *after]
        self._host.deliver(sub, parts, len(before) + len(after))
        metrics = self._host.metrics
        metrics.gaps[reason].inc()
        log.info(
            "gap for a subscriber of %s after id %r: %s",
            self._host.target.topic_key,
            last_event_id[:64],
            reason,
        )

"""Continuity in any order (issue 11, item 1): a hypothesis state machine over the hub.

Any set of clients holding any ids (none, in the ring, older than the ring, the newest, ahead
of the topic, junk) arrives in any order, interleaved with live publishing, catch-ups in flight,
upstream outages and runner crashes, on the virtual clock. After every step each client's
stream is checked against the upstream's history:

- Safety: the events it got are strictly increasing positions in the history (nothing twice,
  nothing backwards); each follows the previous one (or the client's Last-Event-ID, when the
  upstream knows that id) directly, unless a `gap` event comes in between; a gap names the
  client's last id at that point; a client with no Last-Event-ID never gets a gap.
- No needless gap: with an upstream that honours Last-Event-ID, the route resuming from it,
  catch-ups that never fail or hang, ids the upstream knows and no cap on catch-ups, every
  id can be served, so no client gets a gap at all.
- Liveness (teardown): the upstream recovers, publishes, finishes its catch-ups and time
  passes; then every client still subscribed has reached the newest event.

The fake upstream is a history with cursors: the topic's live stream and each catch-up
request are positions in it, advanced in batches by the rules, so the live stream may lag the
history (a client's id can be ahead of the topic) and catch-ups lag or lead the topic. Ids are
opaque and unordered (a hash of the position), so no ordering assumption can pass by luck.
A catch-up replays after its id (an honouring upstream; an unknown id gets either nothing from
history or all of it, drawn per example) or only what is published after the request (an
ignoring upstream). Upstream premises the hub may rely on, kept by the model:
- Streams are prompt: before virtual time passes, every stream that is open, connected and
  not hung has sent what it has (the hub's quiet rule assumes a backlog arrives within a
  second). A hung catch-up (drawn per example) sends nothing more, ever.
- The topic's live stream loses nothing across outages and runner restarts: the hub cannot
  see such a loss (its sink carries no signal), so it is the upstream client's to detect.
- A catch-up request ends cleanly only after sending all the history it has; any other end
  is a failure (it raises).

Where the upstream's answers cannot tell two cases apart, the property allows what the hub
documents (README, "Nothing lost"; each case is explained where it is allowed): a catch-up
whose answer begins exactly where a fresh topic's stream begins, or is empty on a topic that
has published nothing, is a resume from the event just before, or a live answer from an
upstream that ignores the id. Until the topic has seen its upstream resume, the hub says so
with a `resume_unconfirmed` gap there, which the needless-gap check excuses (`unconfirmed`).
A catch-up that ends with nothing after its id justifies a gap too (`catchup_ends`). A topic
whose upstream comes back unable to resume (the route says it cannot, or it was seen not to)
tells every live client with an `upstream_reconnected` gap naming the topic's newest id.

Run: `.venv/bin/pytest -q -p no:cacheprovider tests/test_continuity_property.py`. Under CI=true
it runs `DEFAULT_CI_EXAMPLES` examples, else `DEFAULT_LOCAL_EXAMPLES`; CONTINUITY_EXAMPLES=N
overrides both (a long hunt: CONTINUITY_EXAMPLES=5000).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from prometheus_client import CollectorRegistry

from gateway.config import from_document
from gateway.core.hub import Hub
from gateway.core.route import RouteTable, Target
from gateway.core.topic import Topic, UpstreamSink
from gateway.metrics import Metrics
from gateway.sse import Event, Parser

from .support import FakeClock, FakeSubscriber

# The bar for CI ("at least 500 examples"): about 20 s when the hub passes (about 35 ms
# an example); a failing hub takes a few minutes more, shrinking each distinct failure.
DEFAULT_CI_EXAMPLES = 500
# A quick local run while working on the hub; CONTINUITY_EXAMPLES=N for a longer hunt.
DEFAULT_LOCAL_EXAMPLES = 100
# Long enough for three clients, their catch-ups and the publishes between them to
# interleave; the known failures need about ten steps.
DEFAULT_STEPS = 40
# Loop iterations that let every task woken by a step run to its next wait. The fakes never
# wait on anything but futures the rules resolve, so a handful suffices; spare ones are cheap.
SETTLE_ROUNDS = 12
# Rounds of sending until no prompt stream has anything left: each round can start at most a
# few catch-ups (clients parked on the one that just ended), so a handful ends it.
FLUSH_ROUNDS = 8
# Virtual time passes in steps this short, streams sending between them: under the hub's
# one-second quiet rule, so a prompt stream never looks silent to it.
TICK_SECONDS = 0.5
# Comfortably over the route's catch-up timeout and reconnect wait: time that must end every
# wait in the drain.
CATCHUP_TIMEOUT_SECONDS = 10.0
DRAIN_ADVANCE_SECONDS = CATCHUP_TIMEOUT_SECONDS + 2.0

_ci = os.environ.get("CI") == "true"
_examples = int(
    os.environ.get("CONTINUITY_EXAMPLES", DEFAULT_CI_EXAMPLES if _ci else DEFAULT_LOCAL_EXAMPLES)
)
# Named profiles, used only by this test (loading one would change every hypothesis test).
settings.register_profile(
    "continuity",
    max_examples=_examples,
    stateful_step_count=DEFAULT_STEPS,
    deadline=None,
    print_blob=True,
    # No "explain" phase: on this machine it doubles the time to a report and adds little to
    # the printed steps and the client's stream in the message.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# A run of hundreds of examples outlasts the suite's per-test default.
pytestmark = pytest.mark.timeout(600)


def event_id(position: int) -> str:
    """An opaque id: Knuth's multiplicative hash is a bijection on 32 bits, so ids are unique
    and their order (numeric or textual) says nothing about their position."""
    return format((position * 2654435761 + 0x5BD1E995) % 2**32, "08x")


def route_target(**options: Any) -> Target:
    doc = {"routes": [{"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", **options}]}
    return RouteTable(from_document(doc, {}).routes).resolve("/e/a", [])


# --- the fake upstream ----------------------------------------------------------------------


@dataclass(eq=False)
class Response:
    """One upstream response being served: the topic's live stream or a catch-up."""

    sink: UpstreamSink
    cursor: int  # the history position it sends next
    end: asyncio.Future[None]  # resolved by a rule: the request returns, or raises
    last_event_id: str | None = None
    open: bool = True
    hung: bool = False


class ScriptedHistory:
    """`Upstreams` over one history; the rules decide when each response sends and ends."""

    def __init__(self, honour: bool, unknown_replays_all: bool) -> None:
        self.honour = honour
        self.unknown_replays_all = unknown_replays_all
        self.history: list[Event] = []
        self.positions: dict[str, int] = {}
        self.live: Response | None = None
        # Per topic (by identity): the position of the first event its live stream sent.
        self.first_sent: dict[UpstreamSink, int] = {}
        self.live_down = False
        self.catchups: list[Response] = []

    def produce(self, count: int) -> None:
        for _ in range(count):
            position = len(self.history)
            ident = event_id(position)
            self.history.append(Event(f"e{position}", id=ident))
            self.positions[ident] = position

    def pending(self, response: Response) -> int:
        return len(self.history) - response.cursor

    def send(self, response: Response, count: int) -> None:
        batch = self.history[response.cursor : response.cursor + count]
        response.cursor += len(batch)
        if batch and response is self.live:
            self.first_sent.setdefault(response.sink, response.cursor - len(batch))
        if batch:
            response.sink.publish(batch)

    def live_running(self) -> bool:
        return self.live is not None and self.live.open

    async def stream(self, target: Target, sink: UpstreamSink) -> None:
        previous = self.live
        if previous is not None and previous.sink is sink:
            # The topic restarted its runner: it resumes where the last one stopped. With an
            # honouring upstream the id it asks for decides (a wrong one shows in the streams).
            cursor = previous.cursor
            resume = dict(target.client_headers).get("Last-Event-ID")
            if self.honour and resume in self.positions:
                cursor = self.positions[resume] + 1
        else:
            cursor = len(self.history)  # a new topic opens live
        live = Response(sink, cursor, asyncio.get_running_loop().create_future())
        self.live, self.live_down = live, False
        sink.set_state("connected")
        try:
            await live.end
        finally:
            live.open = False

    async def catch_up(self, target: Target, sink: UpstreamSink, last_event_id: str) -> None:
        if not self.honour:
            cursor = len(self.history)
        elif last_event_id in self.positions:
            cursor = self.positions[last_event_id] + 1
        else:
            cursor = 0 if self.unknown_replays_all else len(self.history)
        response = Response(sink, cursor, asyncio.get_running_loop().create_future(), last_event_id)
        self.catchups.append(response)
        try:
            await response.end
        finally:
            response.open = False

    def open_catchups(self) -> list[Response]:
        return [c for c in self.catchups if c.open and not c.end.done()]


# --- the clients and the check ------------------------------------------------------------


class Violation(AssertionError):
    """A client's stream broke the continuity property."""


# One class per kind of violation, so hypothesis reports (and shrinks) each kind separately.
class SilentLoss(Violation):
    """Events missing with no gap event before them."""


class SilentLossIgnoringUpstream(SilentLoss):
    """The same, where the upstream ignores Last-Event-ID (one that must be detected)."""


class Repeated(Violation):
    """An event twice, or one before the client's position."""


class MisplacedGap(Violation):
    """A gap naming another id than the client's, or a gap for a client that asked for none."""


class NeedlessGap(Violation):
    """A gap where every event could have been served."""


class NeverArrived(Violation):
    """A subscribed client that did not reach the newest event once the upstream recovered."""


@dataclass(eq=False)
class Client:
    sub: FakeSubscriber
    topic: Topic
    last_event_id: str | None
    # The history position its first event must have: after its id, or where it joined live;
    # None when any start is right (an id the upstream does not know).
    expect: int | None
    subscribed: bool = True
    parser: Parser = field(default_factory=Parser)
    chunks_read: int = 0
    events: list[Event] = field(default_factory=list)
    last_id: str | None = None
    highest: int = -1
    gap_pending: bool = False
    gaps: int = 0
    # Gaps the needless-gap check excuses: `resume_unconfirmed` where it cannot be decided.
    excused: int = 0
    # A client with an id the upstream never issued: any gap of its own is justified.
    junk: bool = False

    def describe(self) -> str:
        got = [e.id if e.event != "gap" else f"gap{json.loads(e.data)}" for e in self.events]
        return f"client(last_event_id={self.last_event_id!r}, expect={self.expect}) got {got}"

    def check(
        self,
        positions: dict[str, int],
        also_start: int | None,
        honour: bool,
        undecidable: int | None = None,
    ) -> None:
        """Check the events that arrived since the last call; `also_start`: another position
        the first event may have (see `HubContinuity.also_start`); `undecidable`: where a
        resume cannot be told from a live answer (see `HubContinuity.undecidable`)."""
        new = self.sub.received[self.chunks_read :]
        self.chunks_read = len(self.sub.received)
        for chunk in new:
            for event in self.parser.feed(chunk):
                self.events.append(event)
                self._check_one(event, positions, also_start, honour, undecidable)

    def _check_one(
        self,
        event: Event,
        positions: dict[str, int],
        also_start: int | None,
        honour: bool,
        undecidable: int | None,
    ) -> None:
        if event.event == "gap":
            gap = json.loads(event.data)
            said, reason = gap.get("lastEventId"), gap.get("reason")
            here = self.last_id if self.last_id is not None else self.last_event_id
            if reason == "upstream_reconnected" and (here is None or self.gap_pending):
                # Live from after the topic's newest event (no event of its own since joining
                # or since its last gap), which the gap names: right.
                self.gap_pending = True
                self.gaps += 1
                return
            if self.last_event_id is None and self.last_id is None:
                raise MisplacedGap(f"a gap for a client that asked for nothing: {self.describe()}")
            if reason == "resume_unconfirmed" and self.highest < 0 and self.expect == undecidable:
                self.excused += 1
            if said != here:
                raise MisplacedGap(
                    f"gap names {said!r}, the client is at {here!r}: {self.describe()}"
                )
            self.gap_pending = True
            self.gaps += 1
            return
        position = positions.get(event.id or "")
        if position is None:
            raise Violation(f"an event the upstream never sent: {event!r}: {self.describe()}")
        if position <= self.highest:
            raise Repeated(f"event {event.id} again or out of order: {self.describe()}")
        first = self.highest < 0 and not self.gaps
        if (
            not self.gap_pending
            and self.expect is not None
            and position != self.expect
            and not (first and position == also_start)
        ):
            if position < self.expect:
                raise Repeated(f"event at {position} before {self.expect}: {self.describe()}")
            raise (SilentLoss if honour else SilentLossIgnoringUpstream)(
                f"silent loss: event at {position} where {self.expect} was due, "
                f"no gap: {self.describe()}"
            )
        self.gap_pending = False
        self.highest = position
        self.expect = position + 1
        self.last_id = event.id


# --- the machine ----------------------------------------------------------------------------


class HubContinuity(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        # Every crash and gap the rules cause is logged: thousands of lines that only slow the
        # run (the streams are the test's evidence).
        self.quiet_log = logging.getLogger("gateway.core")
        self.log_level = self.quiet_log.level
        self.quiet_log.setLevel(logging.CRITICAL)
        self.clock = FakeClock()
        self.clients: list[Client] = []
        self.junk = 0
        self.broken = False
        # Whether every gap so far is one the hub could not avoid; see the module docstring.
        self.gaps_justified = False
        self.hangs_allowed = False

    # --- plumbing ---------------------------------------------------------------------

    def step(self, action: Callable[[], object]) -> None:
        """Run `action` inside the loop (the hub creates tasks), then let every task settle."""

        async def run() -> None:
            action()
            for _ in range(SETTLE_ROUNDS):
                await asyncio.sleep(0)

        self.loop.run_until_complete(run())

    def flush(self, live_first: bool = True) -> None:
        """Every prompt stream sends what it has, one batch each, until none has anything
        (a send may start a catch-up, which is prompt too): time may pass after this."""
        up = self.up
        for _ in range(FLUSH_ROUNDS):
            live = up.live if up.live_running() and not up.live_down else None
            order = [c for c in up.open_catchups() if not c.hung]
            if live is not None:
                order.insert(0 if live_first else len(order), live)
            order = [r for r in order if up.pending(r)]
            if not order:
                return
            for response in order:
                # Each in its own step: the hub may end a catch-up as another one sends.
                if response.open and not response.end.done():
                    self.step(functools.partial(up.send, response, up.pending(response)))

    # --- setup ------------------------------------------------------------------------

    @initialize(
        honour=st.sampled_from([True, False]),
        unknown_replays_all=st.booleans(),
        upstream_resume=st.sampled_from([True, False]),
        # A ring holding all the topic carried (catch-ups then bridge into it), or a tiny one.
        ring_events=st.sampled_from([100, 3, 2, 5]),
        max_catchups=st.sampled_from([100, 2, 1, 0]),
        hangs=st.booleans(),
    )
    def setup(
        self,
        honour: bool,
        unknown_replays_all: bool,
        upstream_resume: bool,
        ring_events: int,
        max_catchups: int,
        hangs: bool,
    ) -> None:
        self.up = ScriptedHistory(honour, unknown_replays_all)
        self.target = route_target(
            ring_events=ring_events,
            max_catchups=max_catchups,
            upstream_resume=upstream_resume,
            catchup_timeout_seconds=CATCHUP_TIMEOUT_SECONDS,
            linger_seconds=5.0,
            # Backoff draws from an unseeded random: with every wait under the shortest
            # step of time, a restart never depends on the draw (hypothesis needs replays).
            reconnect_initial_seconds=0.4,
            reconnect_max_seconds=0.4,
        )
        self.hub = Hub(self.up, self.clock, Metrics(CollectorRegistry()))
        self.hangs_allowed = hangs
        self.gaps_justified = not (honour and upstream_resume and max_catchups >= 100)

    # --- clients ----------------------------------------------------------------------

    @rule(
        kind=st.sampled_from(["none", "any", "recent", "newest", "old", "junk"]),
        pick=st.integers(0, 1000),
    )
    def subscribe(self, kind: str, pick: int) -> None:
        history = self.up.history
        last_event_id: str | None = None
        if kind == "junk":
            # Two at most, so catch-ups are shared, and fewer than the hub's IGNORED_AFTER: a
            # few junk ids must not make an honest upstream look like one that ignores the
            # header (a junk client's own gap is justified, nobody else's).
            last_event_id = f"junk-{pick % 2}"
        elif history and kind != "none":
            ring = self.target.route.ring_events
            if kind == "newest":
                position = len(history) - 1
            elif kind == "recent":
                position = max(0, len(history) - ring) + pick % min(ring, len(history))
            elif kind == "old":
                position = pick % max(1, len(history) - ring)
            else:
                position = pick % len(history)
            last_event_id = history[position].id
        sub = FakeSubscriber()
        topics: list[Topic] = []
        self.step(lambda: topics.append(self.hub.subscribe(self.target, sub, last_event_id)))
        if last_event_id is None:
            # Live from where the topic's stream is now (a new topic's opened in the step).
            live = self.up.live
            expect: int | None = (
                live.cursor if live is not None and live.sink is topics[0] else len(history)
            )
        else:
            known = self.up.positions.get(last_event_id)
            expect = None if known is None else known + 1
        self.clients.append(Client(sub, topics[0], last_event_id, expect, junk=kind == "junk"))

    @precondition(lambda self: any(c.subscribed for c in self.clients))
    @rule(pick=st.integers(0, 1000))
    def unsubscribe(self, pick: int) -> None:
        subscribed = [c for c in self.clients if c.subscribed]
        client = subscribed[pick % len(subscribed)]
        client.subscribed = False
        self.step(lambda: self.hub.unsubscribe(client.topic, client.sub))

    # --- the upstream -----------------------------------------------------------------

    @rule(count=st.integers(1, 4))
    def produce(self, count: int) -> None:
        self.up.produce(count)

    @precondition(
        lambda self: self.up.live_running() and not self.up.live_down and self.up.live is not None
    )
    @rule(count=st.integers(1, 4))
    def live_sends(self, count: int) -> None:
        live = self.up.live
        assert live is not None
        self.step(lambda: self.up.send(live, count))

    @precondition(lambda self: bool(self.up.open_catchups()))
    @rule(pick=st.integers(0, 1000), count=st.integers(1, 4))
    def catchup_sends(self, pick: int, count: int) -> None:
        responses = [c for c in self.up.open_catchups() if not c.hung]
        if responses:
            response = responses[pick % len(responses)]
            self.step(lambda: self.up.send(response, count))

    @precondition(lambda self: bool(self.up.open_catchups()))
    @rule(pick=st.integers(0, 1000))
    def catchup_ends(self, pick: int) -> None:
        """The request returns after sending all it has (an upstream that closes at the end)."""
        responses = [c for c in self.up.open_catchups() if not c.hung]
        if responses:
            response = responses[pick % len(responses)]
            self.step(lambda: self.up.send(response, self.up.pending(response)))
            live = self.up.live
            if response.cursor == self.up.positions.get(response.last_event_id or "", -2) + 1 or (
                live is not None and response.cursor == live.cursor
            ):
                # It ends having sent nothing after the id, or ends exactly where the topic's
                # stream will go on: nothing overlaps, so whether the topic's next event comes
                # right after what it sent (or before it, on a lagging topic) cannot be told.
                # Waiting for a meeting, then a gap, is the safe answer.
                self.gaps_justified = True
            if not response.end.done():
                self.step(lambda: response.end.set_result(None))

    @precondition(lambda self: bool(self.up.open_catchups()))
    @rule(pick=st.integers(0, 1000))
    def catchup_fails(self, pick: int) -> None:
        responses = self.up.open_catchups()
        response = responses[pick % len(responses)]
        self.gaps_justified = True
        self.step(lambda: response.end.set_exception(ConnectionResetError("catch-up cut")))

    @precondition(lambda self: self.hangs_allowed and bool(self.up.open_catchups()))
    @rule(pick=st.integers(0, 1000))
    def catchup_hangs(self, pick: int) -> None:
        """A catch-up that goes silent for good, its connection open: after its backlog (the
        hub's quiet rule takes a second of silence on a quiet topic as the end of history, a
        documented premise; see catchup.py), so only one that has sent all it has hangs."""
        responses = [r for r in self.up.open_catchups() if not self.up.pending(r)]
        if responses:
            responses[pick % len(responses)].hung = True
            self.gaps_justified = True

    @precondition(lambda self: self.up.live_running() and not self.up.live_down)
    @rule()
    def live_drops(self) -> None:
        live = self.up.live
        assert live is not None
        self.up.live_down = True
        self.outage_under_catchups()
        self.step(lambda: live.sink.set_state("backoff"))

    def outage_under_catchups(self) -> None:
        """The topic's stream goes down under catch-ups in flight: what they receive now is
        history, or live events the topic misses (from an upstream that ignores the id), and
        nothing tells which, so the hub says `resume_unconfirmed` for them (documented)."""
        if self.up.open_catchups():
            self.gaps_justified = True

    @precondition(lambda self: self.up.live_running() and self.up.live_down)
    @rule()
    def live_reconnects(self) -> None:
        live = self.up.live
        assert live is not None
        self.up.live_down = False

        def reconnect() -> None:
            live.sink.set_state("connecting")
            live.sink.set_state("connected")

        self.step(reconnect)

    @precondition(lambda self: self.up.live_running())
    @rule(raises=st.booleans())
    def runner_ends(self, raises: bool) -> None:
        """The topic's runner raises or returns (a bug it must contain): it is restarted."""
        live = self.up.live
        assert live is not None
        self.outage_under_catchups()
        if raises:
            self.step(lambda: live.end.set_exception(RuntimeError("runner bug")))
        else:
            self.step(lambda: live.end.set_result(None))

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 11.0, 400.0]), live_first=st.booleans())
    def time_passes(self, seconds: float, live_first: bool) -> None:
        self.advance(seconds, live_first)

    def advance(self, seconds: float, live_first: bool = True) -> None:
        """Time passes in small steps, every prompt stream sending what it has before each (a
        catch-up a timer starts on the way is prompt too)."""
        while seconds > 0:
            self.flush(live_first)
            tick = min(seconds, TICK_SECONDS) if self.anything_pending() else seconds
            self.step(functools.partial(self.clock.advance, tick))
            seconds -= tick

    def anything_pending(self) -> bool:
        """Whether a timer may start or end something a stream must answer promptly: catch-ups
        in flight, clients parked for one (private state, read on purpose), or a topic whose
        runner is down. Otherwise time can pass in one jump (a quicker run)."""
        if self.up.open_catchups() or not self.up.live_running() or self.up.live_down:
            return True
        return any(topic._resumer._parked for topic in self.hub.topics.values())

    def also_start(self, client: Client) -> int | None:
        """Where a resuming client may also start: the first event its topic carried, when the
        upstream ignores Last-Event-ID. A catch-up that begins where a fresh topic's stream
        begins looks exactly like an honest one from the head (the client's id the event
        before), and nothing the upstream sends later tells them apart. Splicing there is what
        keeps clients that were up to date gap-free after a gateway restart, so it is allowed;
        an ignoring upstream is detectable (and must be answered with a gap) everywhere else.
        """
        if self.up.honour or client.last_event_id is None:
            return None
        return self.up.first_sent.get(client.topic)

    def undecidable(self, client: Client) -> int | None:
        """The position where a resuming client's catch-up cannot be told from a live answer:
        the first event its topic's stream carried (or will carry, if it carried none yet)."""
        if client.last_event_id is None:
            return None
        return self.up.first_sent.get(client.topic, len(self.up.history))

    # --- the property -----------------------------------------------------------------

    @invariant()
    def every_stream_is_continuous(self) -> None:
        if not hasattr(self, "up"):
            return
        try:
            for client in self.clients:
                client.check(
                    self.up.positions,
                    self.also_start(client),
                    self.up.honour,
                    self.undecidable(client),
                )
                if not self.gaps_justified and not client.junk and client.gaps > client.excused:
                    raise NeedlessGap(
                        "a gap although the upstream honours every id and nothing failed: "
                        + client.describe()
                    )
        except BaseException:
            self.broken = True
            raise

    def teardown(self) -> None:
        try:
            if hasattr(self, "up") and not self.broken:
                self.drain()
        finally:
            if hasattr(self, "hub"):
                self.loop.run_until_complete(self.hub.close())
            self.loop.close()
            self.quiet_log.setLevel(self.log_level)

    def drain(self) -> None:
        """The upstream recovers and time passes: every client still here reaches the end."""
        up = self.up
        for _ in range(3):
            if up.live_running() and up.live_down:
                self.live_reconnects()
            self.flush()
            self.advance(DRAIN_ADVANCE_SECONDS)  # runners restart
        up.produce(1)
        self.flush()
        for response in up.open_catchups():
            if not response.hung:
                self.step(functools.partial(response.end.set_result, None))
        for _ in range(3):
            self.flush()
            self.advance(DRAIN_ADVANCE_SECONDS)
        up.produce(1)
        self.flush()
        self.every_stream_is_continuous()
        newest = up.history[-1].id
        for client in self.clients:
            here = client.subscribed and client.sub.outcome is None
            if here and client.last_id != newest:
                raise NeverArrived(f"never reached {newest}: {client.describe()}")


HubContinuity.TestCase.settings = settings.get_profile("continuity")
TestHubContinuity = HubContinuity.TestCase

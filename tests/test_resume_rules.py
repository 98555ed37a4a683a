"""The resumer's rules, one at a time: scripted upstreams, a virtual clock (see resume.py)."""

from __future__ import annotations

import json
from typing import Any

from gateway.core import ids as ids_rule
from gateway.core.hub import Hub
from gateway.core.resume import PARK_SECONDS, REPROBE_SECONDS
from gateway.core.ring import Ring, RingLimits
from gateway.core.route import RouteTable, Target
from gateway.core.topic import Topic, UpstreamSink
from gateway.metrics import Metrics
from gateway.sse import Event

from .conftest import value
from .support import FakeClock, FakeSubscriber, ScriptedUpstreams
from .test_replay import ids, numbered, received, target


def learnt(topic: Topic) -> bool | None:
    """What the topic learnt its upstream does with Last-Event-ID (a call: mypy narrows not)."""
    return topic.upstream_resumes


async def live_topic(
    hub: Hub, upstreams: ScriptedUpstreams, **route: Any
) -> tuple[Target, UpstreamSink]:
    """A topic opened by a live subscriber, its upstream connected: (its target, its sink)."""
    t = target(**route)
    hub.subscribe(t, FakeSubscriber())
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("connected")
    return t, sink


def gap_reason(sub: FakeSubscriber) -> str | None:
    gaps = [json.loads(e.data)["reason"] for e in received(sub) if e.event == "gap"]
    assert len(gaps) <= 1
    return gaps[0] if gaps else None


async def test_an_upstream_that_ignores_last_event_id_is_a_gap_and_is_remembered(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    t, sink = await live_topic(hub, upstreams, ring_events=3)
    sink.publish(numbered(1, 5))  # the ring keeps 3 4 5; 1 and 2 the topic carried
    sub = FakeSubscriber()
    topic = hub.subscribe(t, sub, "2")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(6, 1))  # its answer is the live stream
    sink.publish(numbered(6, 2))  # 6 follows 5 here, not 2: the header was ignored
    assert gap_reason(sub) == "upstream_ignored_resume"
    assert ids(sub) == [None, "6", "7"]  # the gap where history breaks, then everything after
    assert learnt(topic) is False  # an id it carried itself: proof
    later = FakeSubscriber()
    hub.subscribe(t, later, "1")  # remembered: the gap at once, no request
    assert gap_reason(later) == "upstream_ignored_resume"
    assert len(upstreams.catchups) == 1
    sink.publish(numbered(8, 1))
    assert ids(later) == [None, "8"]
    assert value(metrics, "sse_gateway_gaps_total", reason="upstream_ignored_resume") == 2


async def test_live_answers_to_unknown_ids_mark_an_upstream_as_ignoring_after_three(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(1, 1))
    subs = []
    for n, junk in enumerate(["a", "b", "c"]):  # ids this process never carried
        sub = FakeSubscriber()
        topic = hub.subscribe(t, sub, junk)
        await upstreams.wait_catchups(n + 1)
        upstreams.catchups[n][1].publish(numbered(2 + n, 1))  # live answers
        sink.publish(numbered(2 + n, 1))
        subs.append(sub)
    # One or two could be junk or expired ids an honest upstream did not know: said, not learnt.
    assert [gap_reason(s) for s in subs] == [
        "resume_unconfirmed",
        "resume_unconfirmed",
        "upstream_ignored_resume",
    ]
    assert learnt(topic) is False
    late = FakeSubscriber()
    hub.subscribe(t, late, "d")
    assert gap_reason(late) == "upstream_ignored_resume"
    assert len(upstreams.catchups) == 3
    clock.advance(REPROBE_SECONDS)  # it may have been wrong: one request goes out again
    probe = FakeSubscriber()
    hub.subscribe(t, probe, "-1")
    await upstreams.wait_catchups(4)
    upstreams.catchups[3][1].publish(numbered(0, 6))  # history after all: 0 was never live
    assert learnt(topic) is True
    assert ids(probe) == ["0", "1", "2", "3", "4"]  # met at 1, then the ring


async def test_a_junk_id_does_not_turn_an_upstream_known_to_resume_into_one_that_ignores(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(10, 1))
    honest = FakeSubscriber()
    topic = hub.subscribe(t, honest, "7")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(8, 3))  # history: it resumes
    assert learnt(topic) is True
    for n, junk in enumerate(["x", "y", "z", "w"]):
        sub = FakeSubscriber()
        hub.subscribe(t, sub, junk)
        await upstreams.wait_catchups(n + 2)
        upstreams.catchups[n + 1][1].publish(numbered(11 + n, 1))  # it did not know the id
        sink.publish(numbered(11 + n, 1))
        assert gap_reason(sub) == "resume_unconfirmed"
    assert learnt(topic) is True
    sink.set_state("backoff")
    sink.set_state("connected")  # a resuming upstream's reconnect is no gap
    sink.publish(numbered(15, 1))
    assert gap_reason(honest) is None


async def test_a_gateway_id_outside_the_ring_is_a_gap_at_once(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(1, 1))
    sub = FakeSubscriber()
    hub.subscribe(t, sub, ids_rule.replacement("x" * 5000))  # after a restart, say
    assert gap_reason(sub) == "not_in_ring"
    assert upstreams.catchups == []  # no upstream could answer it


async def test_an_answer_that_starts_where_the_topic_began_is_unconfirmed_until_a_resume_is_seen(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t = target()
    hub.subscribe(t, FakeSubscriber())
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("connected")  # a gateway restart: the topic opened live, its ring empty
    first = FakeSubscriber()
    topic = hub.subscribe(t, first, "41")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(42, 1))
    sink.publish(numbered(42, 1))  # the same first event: a resume from 41, or a live answer
    assert gap_reason(first) == "resume_unconfirmed"
    assert ids(first) == [None, "42"]
    assert learnt(topic) is None
    second = FakeSubscriber()
    hub.subscribe(t, second, "30")
    await upstreams.wait_catchups(2)
    upstreams.catchups[1][1].publish(numbered(31, 12))  # events the topic never had: a resume
    assert ids(second) == [str(i) for i in range(31, 43)]
    assert learnt(topic) is True
    third = FakeSubscriber()
    hub.subscribe(t, third, "35")  # bridged into the ring: a hit
    assert ids(third) == [str(i) for i in range(36, 43)]
    fourth = FakeSubscriber()
    hub.subscribe(t, fourth, "20")
    await upstreams.wait_catchups(3)
    # It meets the ring at 30, which the ring knows only as a position (the second catch-up
    # started there): the catch-up's copy of 30 is kept, not lost.
    upstreams.catchups[2][1].publish(numbered(21, 10))
    assert ids(fourth) == [str(i) for i in range(21, 43)]
    fifth = FakeSubscriber()
    hub.subscribe(t, fifth, "29")
    assert ids(fifth) == [str(i) for i in range(30, 43)]
    assert len(upstreams.catchups) == 3
    assert all(gap_reason(s) is None for s in (second, third, fourth, fifth))


async def test_ids_inside_a_catch_up_in_flight_wait_for_it_instead_of_a_request(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(50, 1))
    a, b, c = FakeSubscriber(), FakeSubscriber(), FakeSubscriber()
    hub.subscribe(t, a, "40")
    hub.subscribe(t, b, "45")  # nothing fetched yet: parked, no second request
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(41, 6))  # 41..46: holds 45
    hub.subscribe(t, c, "43")  # already fetched: waits on it too
    assert len(upstreams.catchups) == 1
    upstreams.catchups[0][1].publish(numbered(47, 4))  # ...50 meets the ring
    assert ids(a) == [str(i) for i in range(41, 51)]
    assert ids(b) == [str(i) for i in range(46, 51)]
    assert ids(c) == [str(i) for i in range(44, 51)]
    assert value(metrics, "sse_gateway_catchup_requests_total") == 1


async def test_a_client_parked_behind_a_slow_catch_up_starts_its_own(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(50, 1))
    slow, other = FakeSubscriber(), FakeSubscriber()
    hub.subscribe(t, slow, "10")
    hub.subscribe(t, other, "30")
    await upstreams.wait_catchups()
    clock.advance(PARK_SECONDS)
    await upstreams.wait_catchups(2)
    assert [i for i, _ in upstreams.catchups] == ["10", "30"]
    upstreams.catchups[1][1].publish(numbered(31, 20))
    assert ids(other) == [str(i) for i in range(31, 51)]
    assert slow.received == []


async def test_an_upstream_that_replays_from_the_id_itself_repeats_nothing(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(10, 1))
    sub = FakeSubscriber()
    hub.subscribe(t, sub, "5")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(5, 6))  # 5 (which the client has), 6..10
    assert ids(sub) == ["6", "7", "8", "9", "10"]


async def test_an_id_past_where_a_catch_up_met_the_topic_waits_for_the_topic(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    sink.publish(numbered(3, 1))
    a, b = FakeSubscriber(), FakeSubscriber()
    hub.subscribe(t, a, "5")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(6, 3))  # ahead of the topic: 6 7 8
    hub.subscribe(t, b, "7")
    sink.publish(numbered(4, 3))  # the topic reaches 6: the catch-up meets it there
    assert ids(a) == ["6"]
    assert b.received == []  # 7 is past the meeting point: the topic has not sent it yet
    await upstreams.wait_catchups(2)
    upstreams.catchups[1][1].publish(numbered(8, 1))
    sink.publish(numbered(7, 2))
    assert ids(a) == ["6", "7", "8"]
    assert ids(b) == ["8"]
    assert gap_reason(a) is None
    assert gap_reason(b) is None


async def test_an_upstream_id_a_client_could_not_send_back_is_replaced_in_the_ring_and_catch_up(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    long_id = "x" * 2000
    sink.publish([Event("live", id=long_id), *numbered(2, 1)])
    sub = FakeSubscriber()
    hub.subscribe(t, sub, "0")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish([Event("one", id="1"), Event("live", id=long_id)])
    sent = ids(sub)
    assert sent[0] == "1"
    assert sent[2] == "2"
    replaced = sent[1]
    assert replaced is not None
    assert replaced.startswith("~")
    assert len(replaced) == 21
    again = FakeSubscriber()
    hub.subscribe(t, again, replaced)  # the id it was sent is a ring hit
    assert ids(again) == ["2"]


async def test_an_upstream_that_comes_back_unable_to_resume_is_a_gap_for_everyone(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    t = target(upstream_resume=False)  # the route says its upstream ignores Last-Event-ID
    live = FakeSubscriber()
    hub.subscribe(t, live)
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("connected")
    sink.publish(numbered(1, 3))
    sink.set_state("backoff")  # the upstream drops; whatever it sends meanwhile is lost
    sink.set_state("connecting")
    sink.set_state("connected")
    assert ids(live) == ["1", "2", "3"]  # owed, not sent: nothing to put it in front of yet
    sink.publish(numbered(9, 1))
    assert ids(live) == ["1", "2", "3", None, "9"]
    assert gap_reason(live) == "upstream_reconnected"
    assert json.loads(received(live)[3].data)["lastEventId"] == "3"
    late = FakeSubscriber()
    hub.subscribe(t, late, "2")  # a replay across the break says so too
    assert ids(late) == ["3", None, "9"]
    assert value(metrics, "sse_gateway_gaps_total", reason="upstream_reconnected") == 1


async def test_an_upstream_that_resumes_its_own_stream_is_no_gap(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t = target()
    live = FakeSubscriber()
    hub.subscribe(t, live)
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("connected")
    sink.publish(numbered(1, 3))
    sink.set_state("backoff")
    sink.set_state("connected")  # it reconnected with Last-Event-ID: 3
    sink.publish(numbered(4, 1))
    assert ids(live) == ["1", "2", "3", "4"]


async def test_a_stream_without_ids_that_reconnects_is_a_gap(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t = target()
    live = FakeSubscriber()
    hub.subscribe(t, live)
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("backoff")  # failures before it ever streamed lose nothing
    sink.set_state("connected")
    sink.publish([Event("a")])
    sink.set_state("backoff")
    sink.set_state("connected")  # nothing to resume from
    sink.publish([Event("b")])
    assert [e.event for e in received(live)] == ["message", "gap", "message"]


async def test_what_an_upstream_does_with_last_event_id_is_known_to_all_its_topics(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t = target()
    other = RouteTable([t.route]).resolve("/e/b", [])
    assert other is not None
    hub.subscribe(t, FakeSubscriber())
    await upstreams.wait_opened()
    sink = upstreams.sinks[t.topic_key]
    sink.set_state("connected")
    sink.publish(numbered(1, 2))
    hub.subscribe(t, FakeSubscriber(), "1")
    # (1 is in the ring: a hit. Subscribe one the ring evicted below instead.)
    sink.publish(numbered(3, 1000))
    hub.subscribe(t, FakeSubscriber(), "2")  # carried, then evicted from the 1,000-event ring
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(1003, 1))
    sink.publish(numbered(1003, 1))  # ignored: learnt for the backend, not just this topic
    sub = FakeSubscriber()
    topic_b = hub.subscribe(other, sub, "x")
    assert learnt(topic_b) is False
    assert gap_reason(sub) == "upstream_ignored_resume"
    assert len(upstreams.catchups) == 1


async def test_a_stream_that_never_published_reconnects_without_a_gap(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams)
    live = FakeSubscriber()
    hub.subscribe(t, live)
    sink.set_state("backoff")  # an idle topic's upstream recycled: nobody is behind anything
    sink.set_state("connected")
    sink.publish([Event("a")])
    assert [e.event for e in received(live)] == ["message"]


async def test_events_without_ids_between_do_not_make_a_resume_look_ignored(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    t, sink = await live_topic(hub, upstreams, ring_events=3)
    sink.publish([*numbered(1, 3), Event("ping"), *numbered(4, 2)])  # the ring: ping 4 5
    sub = FakeSubscriber()
    topic = hub.subscribe(t, sub, "3")
    await upstreams.wait_catchups()
    upstreams.catchups[0][1].publish(numbered(4, 2))  # its replay leaves the ping out
    assert ids(sub) == ["4", "5"]
    assert gap_reason(sub) is None
    assert learnt(topic) is not False


async def test_a_reconnect_gap_owed_before_a_batch_of_invalid_events_is_written_once(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    t, sink = await live_topic(hub, upstreams, upstream_resume=False)
    live = FakeSubscriber()
    hub.subscribe(t, live)
    sink.publish(numbered(1, 2))
    sink.set_state("backoff")
    sink.set_state("connected")
    sink.publish([Event("bad\ud800")])  # nothing to put the gap in front of
    sink.publish(numbered(3, 1))
    assert ids(live) == ["1", "2", None, "3"]
    late = FakeSubscriber()
    hub.subscribe(t, late, "1")
    assert ids(late) == ["2", None, "3"]  # once in the ring too
    assert value(metrics, "sse_gateway_gaps_total", reason="upstream_reconnected") == 2  # both live


def test_the_ids_a_ring_remembers_past_eviction_are_bounded_by_its_bytes() -> None:
    ring = Ring(RingLimits(events=10, bytes=64 * 1024, seconds=300))
    ring.remember_evicted(True)
    for n in range(20_000):
        ring.append(f"{n:08d}" + "x" * 1016, b"e", 0.0)  # 1 KiB ids
    assert ring._ghost_bytes <= 64 * 1024  # private, on purpose: the bound is the point
    assert ring.predecessor(f"{19_999:08d}" + "x" * 1016)[0] == "known"
    ring.remember_evicted(False)
    assert not ring._ghosts

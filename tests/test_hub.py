"""The hub without HTTP: a scripted upstream, fake subscribers and a virtual clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import from_document
from gateway.core.hub import Hub
from gateway.core.route import RouteTable, Target
from gateway.core.topic import UpstreamSink
from gateway.errors import TopicLimit
from gateway.metrics import Metrics
from gateway.sse import Event

from .conftest import value
from .support import FakeClock, FakeSubscriber, LogWatcher, ScriptedUpstreams


def targets(*paths: str, linger: float = 5.0) -> list[Target]:
    doc = {
        "routes": [
            {"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", "linger_seconds": linger}
        ]
    }
    table = RouteTable(from_document(doc, {}).routes)
    return [table.resolve(p, []) for p in paths]


async def test_concurrent_first_subscribers_open_one_upstream(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    (target,) = targets("/e/a")
    subs = [FakeSubscriber() for _ in range(100)]
    for sub in subs:
        hub.subscribe(target, sub)
    await upstreams.wait_opened()
    assert upstreams.opened == [target.topic_key]
    assert len(hub.topics) == 1


async def test_one_encode_shared_by_every_subscriber_of_a_framing(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    (target,) = targets("/e/a")
    plain = [FakeSubscriber() for _ in range(3)]

    def angle(raw: bytes) -> bytes:
        return b"<" + raw + b">"

    framed = [FakeSubscriber(framing=angle) for _ in range(2)]
    for sub in plain + framed:
        hub.subscribe(target, sub)
    await upstreams.wait_opened()
    upstreams.sinks[target.topic_key].publish([Event("one", id="1"), Event("two", id="2")])
    assert [s.received for s in plain] == [[b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n"]] * 3
    # The very same bytes object for every subscriber: no per-subscriber copy or encode.
    assert len({id(s.received[0]) for s in plain}) == 1
    assert len({id(s.received[0]) for s in framed}) == 1
    assert framed[0].received[0] == b"<id: 1\ndata: one\n\nid: 2\ndata: two\n\n>"
    assert value(metrics, "sse_gateway_events_received_total") == 2
    assert value(metrics, "sse_gateway_events_delivered_total") == 10


async def test_a_refusing_subscriber_does_not_stop_the_others(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    (target,) = targets("/e/a")
    subs = [FakeSubscriber(), FakeSubscriber(accept=False), FakeSubscriber()]
    for sub in subs:
        hub.subscribe(target, sub)
    await upstreams.wait_opened()
    upstreams.sinks[target.topic_key].publish([Event("x")])
    assert [len(s.received) for s in subs] == [1, 0, 1]


async def test_event_the_encoder_refuses_is_dropped_and_counted(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    (target,) = targets("/e/a")
    sub = FakeSubscriber()
    hub.subscribe(target, sub)
    await upstreams.wait_opened()
    upstreams.sinks[target.topic_key].publish([Event("ok"), Event("bad\ud800"), Event("ok2")])
    assert sub.received == [b"data: ok\n\ndata: ok2\n\n"]
    assert value(metrics, "sse_gateway_events_dropped_total", reason="invalid") == 1
    assert value(metrics, "sse_gateway_events_received_total") == 3
    assert value(metrics, "sse_gateway_events_delivered_total") == 2


async def test_linger_then_close_and_a_returning_subscriber_cancels_the_linger(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics
) -> None:
    (target,) = targets("/e/a", linger=5.0)
    first = FakeSubscriber()
    topic = hub.subscribe(target, first)
    await upstreams.wait_opened()
    hub.unsubscribe(topic, first)
    clock.advance(4.9)
    assert hub.topics == {target.topic_key: topic}  # still lingering
    second = FakeSubscriber()
    assert hub.subscribe(target, second) is topic  # joined during the linger: same upstream
    clock.advance(10)
    assert hub.topics == {target.topic_key: topic}  # the linger was cancelled
    hub.unsubscribe(topic, second)
    clock.advance(5.0)
    assert hub.topics == {}
    await upstreams.wait_cancelled()
    assert upstreams.cancelled == [target.topic_key]
    assert value(metrics, "sse_gateway_topics") == 0
    assert value(metrics, "sse_gateway_subscribers") == 0
    third = FakeSubscriber()
    hub.subscribe(target, third)
    await upstreams.wait_opened(2)
    assert upstreams.opened == [target.topic_key, target.topic_key]


async def test_crashing_upstream_runner_is_contained_to_its_own_topic(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock
) -> None:
    bad, good = targets("/e/bad", "/e/good")
    upstreams.crash.add(bad.topic_key)
    victim, bystander = FakeSubscriber(), FakeSubscriber()
    hub.subscribe(bad, victim)
    hub.subscribe(good, bystander)
    await upstreams.wait_opened(2)
    clock.advance(1.0)  # the crashed runner's first restart
    await upstreams.changes.until(lambda: upstreams.opened.count(bad.topic_key) >= 2)
    assert victim.outcome is None  # still crashing, still connected
    assert bystander.outcome is None
    assert sorted(hub.topics) == sorted([bad.topic_key, good.topic_key])
    upstreams.sinks[good.topic_key].publish([Event("still here")])
    assert bystander.received == [b"data: still here\n\n"]


async def test_close_ends_every_subscriber_and_upstream(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    a, b = targets("/e/a", "/e/b")
    subs = [FakeSubscriber(), FakeSubscriber()]
    hub.subscribe(a, subs[0])
    hub.subscribe(b, subs[1])
    await upstreams.wait_opened(2)
    await hub.close()
    assert [s.outcome for s in subs] == ["shutdown", "shutdown"]
    assert sorted(upstreams.cancelled) == sorted([a.topic_key, b.topic_key])
    with pytest.raises(RuntimeError):
        hub.subscribe(a, FakeSubscriber())


async def test_connected_state_is_counted_once(
    hub: Hub, upstreams: ScriptedUpstreams, metrics: Metrics
) -> None:
    (target,) = targets("/e/a")
    hub.subscribe(target, FakeSubscriber())
    await upstreams.wait_opened()
    sink = upstreams.sinks[target.topic_key]
    sink.set_state("connected")
    sink.set_state("connected")
    assert value(metrics, "sse_gateway_upstream_connections", state="connected") == 1
    assert value(metrics, "sse_gateway_upstream_connections", state="connecting") == 0
    sink.set_state("backoff")
    assert value(metrics, "sse_gateway_upstream_connections", state="connected") == 0
    assert value(metrics, "sse_gateway_upstream_connections", state="backoff") == 1


async def test_topic_cap_per_route(hub: Hub, upstreams: ScriptedUpstreams) -> None:
    doc = {"routes": [{"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", "max_topics": 2}]}
    table = RouteTable(from_document(doc, {}).routes)
    a, b, c = (table.resolve(p, []) for p in ("/e/a", "/e/b", "/e/c"))
    hub.subscribe(a, FakeSubscriber())
    hub.subscribe(b, FakeSubscriber())
    with pytest.raises(TopicLimit):
        hub.admit(c)
    with pytest.raises(TopicLimit):
        hub.subscribe(c, FakeSubscriber())
    hub.subscribe(a, FakeSubscriber())  # joining an open topic is not limited
    await upstreams.wait_opened(2)
    assert sorted(hub.topics) == sorted([a.topic_key, b.topic_key])


async def test_drain_ends_every_stream_in_waves_spread_over_the_window(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock
) -> None:
    (target,) = targets("/e/a")
    subs = [FakeSubscriber() for _ in range(200)]
    for sub in subs:
        hub.subscribe(target, sub)
    await upstreams.wait_opened()
    closed_at: dict[FakeSubscriber, float] = {}
    for sub in subs:
        original = sub.close

        def close(outcome: str, sub: FakeSubscriber = sub, original=original) -> None:  # type: ignore[no-untyped-def]
            closed_at.setdefault(sub, clock.now())
            original(outcome)

        sub.close = close  # type: ignore[method-assign]
    start = clock.now()
    drained = hub.drain(10.0)
    for _ in range(100):
        clock.advance(0.1)
    assert drained.is_set()
    assert {s.outcome for s in subs} == {"shutdown"}
    times = sorted(t - start for t in closed_at.values())
    assert times[0] < 1.0
    assert times[-1] > 9.0
    # 20 waves: no 100 ms holds more than a tenth of the streams.
    buckets = [int(t * 10) for t in times]
    assert max(buckets.count(b) for b in set(buckets)) <= 20


class FlakyUpstreams(ScriptedUpstreams):
    """A runner that raises (or returns) `failures` times, then streams until cancelled."""

    def __init__(self, failures: int, how: str = "raise") -> None:
        super().__init__()
        self.failures = failures
        self.how = how

    async def stream(self, target: Target, sink: UpstreamSink) -> None:
        if not self.failures:
            return await super().stream(target, sink)
        self.failures -= 1
        self.opened.append(target.topic_key)
        self.sinks[target.topic_key] = sink
        self.changes.notify()
        if self.how == "raise":
            raise RuntimeError("a bug in the upstream runner")


class SleepRecordingClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


async def test_5000_runner_crashes_restart_it_within_the_max_delay_and_subscribers_stay(
    metrics: Metrics,
) -> None:
    upstreams = FlakyUpstreams(5000)
    clock = SleepRecordingClock()
    hub = Hub(upstreams, clock, metrics)
    (target,) = targets("/e/a")
    subs = [FakeSubscriber(), FakeSubscriber()]
    for sub in subs:
        hub.subscribe(target, sub)
    for attempt in range(1, 5001):
        await upstreams.wait_opened(attempt)
        assert subs[0].outcome is None, attempt
        clock.advance(30.0)  # route.reconnect_max_seconds: every restart is due by then
    await upstreams.wait_opened(5001)
    assert len(clock.sleeps) == 5000
    assert max(clock.sleeps) <= 30.0
    assert [s.outcome for s in subs] == [None, None]
    assert list(hub.topics) == [target.topic_key]
    upstreams.sinks[target.topic_key].publish([Event("back", id="1")])
    assert [s.received for s in subs] == [[b"id: 1\ndata: back\n\n"]] * 2
    assert value(metrics, "sse_gateway_upstream_runner_restarts_total") == 5000


@pytest.mark.parametrize("how", ["raise", "return"])
async def test_a_runner_that_raises_or_returns_is_restarted_and_its_subscribers_keep_receiving(
    hub: Hub, clock: FakeClock, metrics: Metrics, how: str
) -> None:
    upstreams = FlakyUpstreams(1, how)
    hub = Hub(upstreams, clock, metrics)
    (target,) = targets("/e/a")
    sub = FakeSubscriber()
    with LogWatcher("gateway.core.topic") as logs:
        hub.subscribe(target, sub)
        await upstreams.wait_opened(1)
        await logs.until(lambda records: any("restart" in r for r in records))
    assert value(metrics, "sse_gateway_upstream_runner_restarts_total") == 1
    assert value(metrics, "sse_gateway_upstream_connections", state="backoff") == 1
    clock.advance(1.0)  # reconnect_initial_seconds 0.5: the first restart is due by then
    await upstreams.wait_opened(2)
    upstreams.sinks[target.topic_key].publish([Event("again")])
    assert sub.outcome is None
    assert sub.received == [b"data: again\n\n"]


async def test_direct_runner_that_returns_ends_its_client_stream(
    hub: Hub, upstreams: ScriptedUpstreams
) -> None:
    doc = {
        "routes": [{"name": "r", "path": "/e/{t}", "upstream": "http://u/{t}", "mode": "direct"}]
    }
    target = RouteTable(from_document(doc, {}).routes).resolve("/e/a", [])
    upstreams.give_up.add(target.topic_key)
    sub = FakeSubscriber()
    hub.subscribe(target, sub)
    await sub.changes.until(lambda: sub.outcome is not None)
    assert sub.outcome == "normal"
    assert hub.topics == {}


async def test_drain_is_done_as_soon_as_the_last_subscriber_left(
    hub: Hub, upstreams: ScriptedUpstreams, clock: FakeClock
) -> None:
    a, b = targets("/e/a", "/e/b")
    subs = [FakeSubscriber() for _ in range(10)]
    joined = [(hub.subscribe(a if i % 2 else b, sub), sub) for i, sub in enumerate(subs)]
    await upstreams.wait_opened(2)
    drained = hub.drain(30.0)
    clock.advance(1.0)
    for topic, sub in joined[:-1]:
        hub.unsubscribe(topic, sub)
    assert not drained.is_set()  # one stream is still open
    topic, sub = joined[-1]
    hub.unsubscribe(topic, sub)
    assert drained.is_set()  # at t=1, not at the end of the 30 s window


async def test_a_restarted_runner_resumes_after_the_newest_id_it_published(
    clock: FakeClock, metrics: Metrics
) -> None:
    class Recording(FlakyUpstreams):
        def __init__(self) -> None:
            super().__init__(0)
            self.targets: list[Target] = []

        async def stream(self, target: Target, sink: UpstreamSink) -> None:
            self.targets.append(target)
            if len(self.targets) == 1:
                self.failures = 1  # the first runner publishes, then crashes
                sink.publish([Event("a", id="7")])
            return await super().stream(target, sink)

    upstreams = Recording()
    hub = Hub(upstreams, clock, metrics)
    (target,) = targets("/e/a")
    sub = FakeSubscriber()
    hub.subscribe(target, sub)
    await upstreams.wait_opened(1)
    clock.advance(1.0)
    await upstreams.wait_opened(2)
    assert upstreams.targets[0].client_headers == ()  # a topic's first start opens live
    # Not a silent skip of what the upstream sent while the runner was down.
    assert upstreams.targets[1].client_headers == (("Last-Event-ID", "7"),)
    assert upstreams.targets[1].topic_key == target.topic_key
    assert sub.outcome is None


async def test_a_restarted_runner_never_resumes_from_a_clients_id(
    clock: FakeClock, metrics: Metrics
) -> None:
    """A catch-up's bridge may anchor the ring at a client's Last-Event-ID; a restart must
    resume from what the topic's own runner published, so no client steers the upstream."""

    class Quiet(ScriptedUpstreams):
        def __init__(self) -> None:
            super().__init__()
            self.targets: list[Target] = []
            self.breaking = asyncio.Event()
            self.crashed = False

        async def stream(self, target: Target, sink: UpstreamSink) -> None:
            self.targets.append(target)
            if len(self.targets) > 1:
                return await super().stream(target, sink)
            sink.set_state("connected")
            self.opened.append(target.topic_key)
            self.changes.notify()
            await self.breaking.wait()
            self.crashed = True
            self.changes.notify()  # runs after the topic has armed its restart timer
            raise RuntimeError("a bug in the runner")

        async def catch_up(self, target: Target, sink: UpstreamSink, last_event_id: str) -> None:
            self.catchups.append((last_event_id, sink))
            self.changes.notify()
            sink.publish([Event("fetched", id="fetched")])  # what followed the client's id
            await asyncio.Event().wait()

    upstreams = Quiet()
    hub = Hub(upstreams, clock, metrics)
    (target,) = targets("/e/a")
    topic = hub.subscribe(target, FakeSubscriber())
    await upstreams.wait_opened(1)
    hub.subscribe(target, FakeSubscriber(), "client-chosen")
    await upstreams.changes.until(lambda: len(upstreams.catchups) == 1)
    clock.advance(5.0)  # the catch-up falls silent: complete, bridged at the client's id
    assert topic.ring.after("client-chosen", clock.now()) == [b"id: fetched\ndata: fetched\n\n"]
    assert topic.ring.newest_id == "fetched"
    upstreams.breaking.set()
    await upstreams.changes.until(lambda: upstreams.crashed)
    clock.advance(60.0)
    await upstreams.changes.until(lambda: len(upstreams.targets) == 2)
    assert upstreams.targets[1].client_headers == ()  # live: its runner published no id
    await hub.close()


async def test_a_restart_after_the_upstream_reset_its_id_opens_live(
    clock: FakeClock, metrics: Metrics
) -> None:
    class Resetting(FlakyUpstreams):
        def __init__(self) -> None:
            super().__init__(0)
            self.targets: list[Target] = []

        async def stream(self, target: Target, sink: UpstreamSink) -> None:
            self.targets.append(target)
            if len(self.targets) == 1:
                self.failures = 1  # publishes, resets its id, then crashes
                sink.publish([Event("a", id="7"), Event("b", id="")])
            return await super().stream(target, sink)

    upstreams = Resetting()
    hub = Hub(upstreams, clock, metrics)
    (target,) = targets("/e/a")
    hub.subscribe(target, FakeSubscriber())
    await upstreams.wait_opened(1)
    clock.advance(1.0)
    await upstreams.wait_opened(2)
    assert upstreams.targets[1].client_headers == ()
    await hub.close()

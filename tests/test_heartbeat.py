"""The heartbeat wheel on a virtual clock."""

from __future__ import annotations

import random

from gateway.edge.heartbeat import HeartbeatWheel

from .support import FakeClock


class Sub:
    def __init__(self, clock: FakeClock, interval: float, alive: bool = True) -> None:
        self.clock = clock
        self.heartbeat_seconds = interval
        self.last = clock.now()
        self.beats: list[float] = []
        self.alive = alive

    def last_activity(self) -> float:
        return self.last

    def heartbeat(self) -> bool:
        if not self.alive:
            return False
        self.beats.append(self.clock.now())
        self.last = self.clock.now()
        return True


def run(clock: FakeClock, seconds: float, step: float = 0.05) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_idle_subscriber_gets_a_heartbeat_within_every_interval() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, HeartbeatWheel.tick_for([15.0]), random.Random(1))
    sub = Sub(clock, 15.0)
    start = clock.now()
    wheel.add(sub)
    run(clock, 150, step=0.5)
    assert len(sub.beats) >= 10
    gaps = [b - a for a, b in zip([start, *sub.beats], sub.beats, strict=False)]
    assert all(11.9 <= gap <= 15.0 for gap in gaps), gaps


def test_traffic_resets_the_clock() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, HeartbeatWheel.tick_for([1.0]), random.Random(2))
    busy = Sub(clock, 1.0)
    wheel.add(busy)
    for _ in range(100):  # an event every half interval: never idle long enough
        clock.advance(0.5)
        busy.last = clock.now()
    assert busy.beats == []
    run(clock, 1.0)
    assert len(busy.beats) == 1


def test_ten_thousand_subscribers_share_one_timer() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, HeartbeatWheel.tick_for([15.0]), random.Random(3))
    subs = [Sub(clock, 15.0) for _ in range(10_000)]
    for sub in subs:
        wheel.add(sub)
    live_timers = [t for _, _, t in clock._timers if not t.cancelled]
    assert len(live_timers) == 1
    run(clock, 15.0, step=0.5)
    assert all(len(s.beats) == 1 for s in subs)
    # Jitter: the writes are spread, not all in one tick.
    assert len({s.beats[0] for s in subs}) >= 5


def test_gone_and_discarded_subscribers_leave_the_wheel() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, 0.1, random.Random(4))
    gone, removed, kept = Sub(clock, 1.0, alive=False), Sub(clock, 1.0), Sub(clock, 1.0)
    for sub in (gone, removed, kept):
        wheel.add(sub)
    wheel.discard(removed)
    run(clock, 3.0)
    assert removed.beats == []
    assert gone.beats == []
    assert len(kept.beats) >= 3
    assert len(wheel) == 1


def test_zero_interval_means_off_and_an_empty_wheel_holds_no_timer() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, 0.1)
    off = Sub(clock, 0.0)
    wheel.add(off)
    assert len(wheel) == 0
    assert clock._timers == []
    on = Sub(clock, 1.0)
    wheel.add(on)
    wheel.discard(on)
    run(clock, 1.0)
    assert [t for _, _, t in clock._timers if not t.cancelled] == []


def test_retuned_wheel_keeps_a_shorter_interval_that_the_old_tick_would_overshoot() -> None:
    clock = FakeClock()
    wheel = HeartbeatWheel(clock, HeartbeatWheel.tick_for([15.0]), random.Random(3))  # 0.25 s
    old = Sub(clock, 15.0)
    wheel.add(old)
    run(clock, 5.0)
    # A reload adds a route with a 0.2 s heartbeat: slots of 0.25 s cannot keep it.
    wheel.retune(HeartbeatWheel.tick_for([15.0, 0.2]))
    fast = Sub(clock, 0.2)
    start = clock.now()
    wheel.add(fast)
    run(clock, 20.0, step=0.005)
    gaps = [b - a for a, b in zip([start, *fast.beats], fast.beats, strict=False)]
    assert len(gaps) >= 90
    assert all(0.159 <= gap <= 0.2 + 1e-9 for gap in gaps), max(gaps)
    # The subscribers already in the wheel were re-slotted, not lost.
    old_gaps = [b - a for a, b in zip(old.beats, old.beats[1:], strict=False)]
    assert old.beats
    assert old.beats[0] - 1000.0 <= 15.0
    assert all(11.9 <= gap <= 15.0 for gap in old_gaps), old_gaps


def test_retune_to_the_same_tick_changes_nothing() -> None:
    clock = FakeClock()
    tick = HeartbeatWheel.tick_for([1.0])
    wheel = HeartbeatWheel(clock, tick, random.Random(4))
    sub = Sub(clock, 1.0)
    wheel.add(sub)
    wheel.retune(tick)
    run(clock, 10.0, step=0.01)
    assert 10 <= len(sub.beats) <= 13

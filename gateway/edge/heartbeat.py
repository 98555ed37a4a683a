"""Heartbeats for idle streams without a timer per subscriber.

A hashed timing wheel (Varghese & Lauck, 1987): each subscriber sits in the
slot of the time its heartbeat falls due, and one timer advances the wheel
slot by slot. Traffic costs nothing here: a subscriber's last activity is
derived when its slot comes up (its own last write, or the last publish of
any of its topics, which the hub records once per event, not per
subscriber). A subscriber that saw traffic is simply put back in a later
slot. So 10,000 idle subscribers cost one timer and ~10,000 checks per
interval, and a busy topic costs nothing at all.

Due times are drawn between 80% and 90% of the interval after the last
activity, and the wheel's tick is at most 2% of the interval, so a
heartbeat always comes within the interval (a proxy's idle timeout set to
the interval is never reached) and writes of subscribers that went idle
together are spread over a tenth of the interval.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from ..timing import Clock, Timer

# Earliest and latest point in the interval a heartbeat is scheduled for.
_EARLIEST = 0.8
_SPREAD = 0.1


class Beatable(Protocol):
    heartbeat_seconds: float

    def last_activity(self) -> float: ...

    def heartbeat(self) -> bool:
        """Write a heartbeat; False once the subscriber is gone."""
        ...


class HeartbeatWheel:
    def __init__(self, clock: Clock, tick_seconds: float, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._tick = tick_seconds
        self._rng = rng or random.Random()
        self._slots: dict[int, dict[Beatable, None]] = {}
        self._slot_of: dict[Beatable, int] = {}
        self._cursor = 0
        self._timer: Timer | None = None

    @staticmethod
    def tick_for(intervals: list[float]) -> float:
        """A tick of 2% of the shortest interval (5 ms to 250 ms).

        Fine enough that rounding up to a slot keeps every heartbeat inside its
        interval and that the jitter window (10% of the interval) spans several
        slots; coarse enough that the one timer wakes at most 4 times a second
        at production intervals.
        """
        positive = [i for i in intervals if i > 0]
        return min(0.25, max(0.005, min(positive, default=10.0) * 0.02))

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, sub: Beatable) -> None:
        if sub.heartbeat_seconds <= 0:
            return
        if not self._slot_of:
            self._cursor = math.floor(self._clock.now() / self._tick)
        self._place(sub, sub.last_activity())
        if self._timer is None:
            self._timer = self._clock.call_later(self._tick, self._advance)

    def discard(self, sub: Beatable) -> None:
        slot = self._slot_of.pop(sub, None)
        if slot is not None:
            bucket = self._slots[slot]
            del bucket[sub]
            if not bucket:
                del self._slots[slot]

    def _place(self, sub: Beatable, last: float) -> None:
        interval = sub.heartbeat_seconds
        due = last + interval * (_EARLIEST + _SPREAD * self._rng.random())
        slot = max(math.ceil(due / self._tick), self._cursor + 1)
        self._slots.setdefault(slot, {})[sub] = None
        self._slot_of[sub] = slot

    def _advance(self) -> None:
        self._timer = None
        now = self._clock.now()
        current = math.floor(now / self._tick)
        if current - self._cursor > len(self._slots):
            # Far behind (a long loop stall): visit only the slots that exist.
            due_slots = sorted(s for s in self._slots if s <= current)
        else:
            due_slots = [s for s in range(self._cursor + 1, current + 1) if s in self._slots]
        self._cursor = max(self._cursor, current)
        for slot in due_slots:
            for sub in self._slots.pop(slot):
                del self._slot_of[sub]
                last = sub.last_activity()
                if now - last >= sub.heartbeat_seconds * _EARLIEST:
                    if not sub.heartbeat():
                        continue
                    last = now
                self._place(sub, last)
        if self._slot_of:
            self._timer = self._clock.call_later(self._tick, self._advance)

    def retune(self, tick_seconds: float) -> None:
        """Change the tick, re-slotting every subscriber: a reload brought a shorter interval.

        On the old, coarser tick a new route's heartbeats would round up past their interval.
        """
        if tick_seconds == self._tick:
            return
        subs = list(self._slot_of)
        self._slots.clear()
        self._slot_of.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._tick = tick_seconds
        self._cursor = math.floor(self._clock.now() / tick_seconds)
        for sub in subs:
            self._place(sub, sub.last_activity())
        if subs:
            self._timer = self._clock.call_later(tick_seconds, self._advance)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._slot_of.clear()

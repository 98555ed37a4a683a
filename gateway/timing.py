"""Time seams: a `Clock` the hub and heartbeats read, and a pure jittered backoff.

Everything that waits goes through a `Clock`, so tests can drive time with a
fake clock instead of sleeping, and `Backoff` is a pure function of its
attempt count and a random source, so it is tested without waiting at all.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` after `seconds`; a plain timer, no task, so thousands cost nothing."""
        ...


class MonotonicClock:
    """The real clock: the event loop's monotonic time."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with "full jitter" (AWS architecture blog, 2015).

    Full jitter spreads the reconnects of many topics that failed together
    (one upstream restart drops them all) over the whole window instead of
    letting them return in synchronized waves. `floor_seconds` lets a caller
    honour a server's `retry:` as the minimum wait.
    """

    initial_seconds: float
    max_seconds: float
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self, floor_seconds: float = 0.0) -> float:
        ceiling = self._ceiling()
        self.attempt += 1
        # Half fixed, half random: a pure full jitter can draw ~0 and hammer a
        # struggling upstream; the fixed half keeps the exponential spacing.
        delay = ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        return max(delay, floor_seconds)

    def reset(self) -> None:
        self.attempt = 0

    def _ceiling(self) -> float:
        # Grown step by step and stopped at the ceiling, never `multiplier ** attempt`: that
        # overflows a float after ~1,024 attempts (six hours of outage at the defaults).
        ceiling = self.initial_seconds
        if self.multiplier <= 1.0:  # no growth: the loop below would never reach the ceiling
            return min(self.max_seconds, ceiling)
        for _ in range(self.attempt):
            if ceiling >= self.max_seconds:
                break
            ceiling *= self.multiplier
        return min(self.max_seconds, ceiling)

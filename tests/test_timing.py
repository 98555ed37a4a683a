"""The pure backoff: bounded at any attempt count, jittered, honouring a floor."""

from __future__ import annotations

import random

from gateway.timing import Backoff


def test_delay_stays_bounded_after_thousands_of_failures() -> None:
    # 2.0 ** 1024 overflows a float: a topic down for ~6 h at the defaults used to raise here.
    backoff = Backoff(0.5, 30.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(5000)]
    assert max(delays) <= 30.0
    assert min(delays[20:]) >= 15.0  # at the ceiling: half fixed, half jitter
    assert backoff.attempt == 5000


def test_delay_grows_exponentially_until_the_ceiling_then_resets() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_a_huge_multiplier_or_floor_does_not_break_it() -> None:
    backoff = Backoff(0.1, 60.0, multiplier=1e6, rng=random.Random(2))
    assert all(backoff.next_delay() <= 60.0 for _ in range(2000))
    assert backoff.next_delay(floor_seconds=90.0) == 90.0  # the upstream's retry: wins

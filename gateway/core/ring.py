"""A topic's replay ring: recent events as wire bytes, found by id.

Bounded three ways (per route): a count, a byte total and an age, so the
memory a topic holds is at most `ring_bytes` (plus one entry's bookkeeping per
event, bounded by `ring_events`). Entries keep the bytes the hub already
encoded for the live write, so a replay re-encodes nothing.

Ids are opaque strings with no order. A client resuming after an id replays
from its *last* occurrence (an upstream that repeats ids is broken; this
choice repeats nothing). A catch-up splices at its *first* occurrence, where
the catch-up's copy of the stream lines up with the ring's. The topic's
newest id is remembered even after its entry ages out, so a client holding it
has missed nothing on a quiet topic.

A catch-up that meets the ring's front *bridges* it: its events, anchored at
the id it started from (an entry with that id and no bytes), go in front of
the ring, so the next client holding that id is a ring hit rather than
another upstream request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RingLimits:
    events: int
    bytes: int
    seconds: float


class Ring:
    __slots__ = ("_bytes", "_entries", "_first", "_last", "_limits", "_next_seq", "newest_id")

    def __init__(self, limits: RingLimits) -> None:
        self._limits = limits
        # (seq, id, wire bytes, time appended)
        self._entries: deque[tuple[int, str | None, bytes, float]] = deque()
        self._first: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._bytes = 0
        self._next_seq = 0
        # The id of the newest event that carried one, kept past its entry's eviction.
        self.newest_id: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        """Counts every append: a change means the topic published since it was read."""
        return self._next_seq

    def append(self, event_id: str | None, data: bytes, now: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._entries.append((seq, event_id, data, now))
        self._bytes += len(data)
        if event_id:
            self._first.setdefault(event_id, seq)
            self._last[event_id] = seq
            self.newest_id = event_id
        self._trim(now)

    def _trim(self, now: float) -> None:
        limits = self._limits
        oldest = now - limits.seconds
        entries = self._entries
        while entries and (
            len(entries) > limits.events or self._bytes > limits.bytes or entries[0][3] < oldest
        ):
            seq, event_id, data, _ = entries.popleft()
            self._bytes -= len(data)
            if event_id and self._first.get(event_id) == seq:
                if self._last[event_id] == seq:
                    del self._first[event_id], self._last[event_id]
                else:  # a repeated id: its next occurrence becomes the first (rare, so a scan)
                    self._first[event_id] = next(e[0] for e in entries if e[1] == event_id)

    def bridge(
        self, from_id: str, items: list[tuple[str | None, bytes]], meet_id: str | None, now: float
    ) -> bool:
        """Put a catch-up's `items` (after `from_id`, before `meet_id`) in front of the ring.

        Only where they line up: `meet_id` is the ring's first entry, or the ring is empty and
        `meet_id` is None. Entries take the front's time, so age order is kept.
        """
        entries = self._entries
        if (entries[0][1] if entries else None) != meet_id:
            return False
        front_seq = entries[0][0] if entries else self._next_seq
        stamp = entries[0][3] if entries else now
        for offset, (event_id, data) in enumerate(reversed([(from_id, b""), *items]), 1):
            seq = front_seq - offset
            entries.appendleft((seq, event_id, data, stamp))
            self._bytes += len(data)
            if event_id:
                self._first[event_id] = seq
                self._last.setdefault(event_id, seq)
        if self.newest_id is None:
            self.newest_id = next((i for i, _ in reversed(items) if i), from_id)
        self._trim(now)
        return True

    def _from(self, seq: int) -> list[bytes]:
        start = seq - self._entries[0][0] + 1
        entries = self._entries
        return [entries[i][2] for i in range(start, len(entries))]

    def has(self, event_id: str, now: float) -> bool:
        self._trim(now)
        return event_id in self._last or event_id == self.newest_id

    def after(self, event_id: str, now: float) -> list[bytes] | None:
        """Wire bytes of every event after the last `event_id`, or None if the ring lacks it."""
        self._trim(now)
        seq = self._last.get(event_id)
        if seq is not None:
            return self._from(seq)
        if event_id == self.newest_id:
            return []  # aged out of a quiet topic: nothing newer was published
        return None

    def after_first(self, event_id: str, now: float) -> list[bytes] | None:
        """Wire bytes after the first `event_id`: where a catch-up's copy joins the ring."""
        self._trim(now)
        seq = self._first.get(event_id)
        if seq is not None:
            return self._from(seq)
        return [] if event_id == self.newest_id else None

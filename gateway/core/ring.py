"""A topic's replay ring: recent events as wire bytes, found by id.

Bounded three ways (per route): a count, a byte total and an age, so the
memory a topic holds is at most `ring_bytes` (plus one entry's bookkeeping per
event, bounded by `ring_events`). Entries keep the bytes the hub already
encoded for the live write, so a replay re-encodes nothing.

Ids are opaque strings with no order: the ring's order is the order the
upstream gave. A client resuming after an id replays from its *last*
occurrence (an upstream that repeats ids is broken; this choice repeats
nothing). A catch-up splices at its *first* occurrence, where the catch-up's
copy of the stream lines up with the ring's.

Besides its entries, the ring knows *positions*: "after id X come the entries
from here on". The newest id is one (kept after its entry ages out, so a
client holding it on a quiet topic has missed nothing). A catch-up that meets
the ring's front *bridges* it: its events go in front of the ring, and the id
it started from becomes an *anchor*, the position before them, so the next
client holding that id is a ring hit rather than another upstream request. An
anchor is only a position, never an entry: the event it names was not fetched,
so there are no bytes to replay for it. A position holds while the ring still
has every entry after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RingLimits:
    events: int
    bytes: int
    seconds: float


class Ring:
    __slots__ = (
        "_anchors",
        "_bytes",
        "_entries",
        "_first",
        "_last",
        "_limits",
        "_newest",
        "_next_seq",
    )

    def __init__(self, limits: RingLimits) -> None:
        self._limits = limits
        # (seq, id, wire bytes, time appended); seqs are consecutive, front to back.
        self._entries: deque[tuple[int, str | None, bytes, float]] = deque()
        self._first: dict[str, int] = {}
        self._last: dict[str, int] = {}
        # id -> the seq of the first entry after it, for ids that are not entries.
        self._anchors: dict[str, int] = {}
        # The newest id and the seq after it, kept past its entry's eviction.
        self._newest: tuple[str, int] | None = None
        self._bytes = 0
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        """Counts every append: a change means the topic published since it was read."""
        return self._next_seq

    @property
    def newest_id(self) -> str | None:
        return self._newest[0] if self._newest else None

    @property
    def front(self) -> int:
        """The seq of the oldest entry (the next one's if the ring is empty)."""
        return self._entries[0][0] if self._entries else self._next_seq

    def append(self, event_id: str | None, data: bytes, now: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        self._entries.append((seq, event_id, data, now))
        self._bytes += len(data)
        if event_id:
            self._first.setdefault(event_id, seq)
            self._last[event_id] = seq
            self._newest = (event_id, seq + 1)
        self._trim(now)

    def _trim(self, now: float) -> None:
        limits = self._limits
        oldest = now - limits.seconds
        entries = self._entries
        trimmed = False
        while entries and (
            len(entries) > limits.events or self._bytes > limits.bytes or entries[0][3] < oldest
        ):
            trimmed = True
            seq, event_id, data, _ = entries.popleft()
            self._bytes -= len(data)
            if event_id and self._first.get(event_id) == seq:
                if self._last[event_id] == seq:
                    del self._first[event_id], self._last[event_id]
                else:  # a repeated id: its next occurrence becomes the first (rare, so a scan)
                    self._first[event_id] = next(e[0] for e in entries if e[1] == event_id)
        if trimmed and self._anchors:
            front = self.front
            for anchor in [a for a, seq in self._anchors.items() if seq < front]:
                del self._anchors[anchor]

    def position(self, event_id: str, *, first: bool = False) -> int | None:
        """The seq right after `event_id` (its last occurrence, or its first), or None if the
        ring no longer holds everything after it."""
        seq = (self._first if first else self._last).get(event_id)
        if seq is not None:
            return seq + 1
        after = self._anchors.get(event_id)
        if after is None and self._newest is not None and self._newest[0] == event_id:
            after = self._newest[1]
        if after is not None and after >= self.front:
            return after
        return None

    def entry_id(self, seq: int) -> tuple[bool, str | None]:
        """(True, its id) for the entry at `seq`, (False, None) if the ring holds none there."""
        front = self.front
        if front <= seq < self._next_seq:
            return True, self._entries[seq - front][1]
        return False, None

    def is_anchor(self, event_id: str) -> bool:
        """True if `event_id` is known here only as a position a catch-up started from."""
        after = self._anchors.get(event_id)
        return after is not None and after >= self.front

    def before(self, event_id: str) -> tuple[bool, str | None]:
        """What the ring knows comes right before the first `event_id`: (True, that entry's
        or anchor's id, None for an entry without one), or (False, None) if it does not know."""
        seq = self._first.get(event_id)
        if seq is None:
            return False, None
        front = self.front
        if seq > front:
            return True, self._entries[seq - 1 - front][1]
        anchor = next((a for a, s in self._anchors.items() if s == seq), None)
        return anchor is not None, anchor

    def since(self, seq: int) -> list[bytes]:
        """Wire bytes of every entry from `seq` on."""
        entries = self._entries
        start = max(0, seq - self.front)
        return [entries[i][2] for i in range(start, len(entries))]

    def has(self, event_id: str, now: float) -> bool:
        self._trim(now)
        return self.position(event_id) is not None

    def after(self, event_id: str, now: float) -> list[bytes] | None:
        """Wire bytes of every event after the last `event_id`, or None if the ring lacks it."""
        self._trim(now)
        seq = self.position(event_id)
        return None if seq is None else self.since(seq)

    def after_first(self, event_id: str, now: float) -> list[bytes] | None:
        """Wire bytes after the first `event_id`: where a catch-up's copy joins the ring."""
        self._trim(now)
        seq = self.position(event_id, first=True)
        return None if seq is None else self.since(seq)

    def bridge(
        self, from_id: str, items: Sequence[tuple[str | None, bytes]], meet: int, now: float
    ) -> bool:
        """Put a catch-up's `items` (the events after `from_id` that precede position `meet`)
        in front of the ring, and anchor `from_id` before them.

        Only where they line up: `meet` is the ring's front. Entries take the front's time,
        so age order is kept.
        """
        self._trim(now)
        entries = self._entries
        front = self.front
        if meet != front:
            return False
        stamp = entries[0][3] if entries else now
        seq = front
        for event_id, data in reversed(items):
            seq -= 1
            entries.appendleft((seq, event_id, data, stamp))
            self._bytes += len(data)
            if event_id:
                self._first[event_id] = seq
                self._last.setdefault(event_id, seq)
        if from_id not in self._last:
            self._anchors[from_id] = seq
        if self._newest is None:
            # The ring carried no id: its newest is now the last one bridged.
            newest = next(
                (
                    (event_id, front - i)
                    for i, (event_id, _) in enumerate(reversed(items))
                    if event_id
                ),
                (from_id, seq),
            )
            self._newest = newest
        self._trim(now)
        return True

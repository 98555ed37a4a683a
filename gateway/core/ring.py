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

While a catch-up is in flight the ring also remembers the ids it evicts
(*ghosts*, ids only, no bytes; at most `GHOST_EVENTS_PER_RING_EVENT` times
`ring_events`, or `MIN_GHOST_EVENTS`), so whether a catch-up's first event is one the topic carried,
and what came before it there, can be told even when a small ring has
already dropped it (see resume.py). The ids of the last `RECENT_EVICTED`
evicted entries are always kept, for the same reason (a quiet topic's ring
ages out before any catch-up begins).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# Ghosts kept per ring entry while catch-ups are in flight: a catch-up lasts at most its
# timeout, and ten rings' worth of events covers that at any rate the ring itself suits.
GHOST_EVENTS_PER_RING_EVENT = 10
# ...and at least this many, for small rings (ids only: some tens of KiB while it lasts).
MIN_GHOST_EVENTS = 1024
# Evicted ids always kept: enough for a client a few events behind a topic whose ring aged out.
RECENT_EVICTED = 64
# How far back past events without an id a predecessor is looked for.
PREDECESSOR_WALK = 64


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
        "_ghost_bytes",
        "_ghost_first",
        "_ghosts",
        "_last",
        "_limits",
        "_newest",
        "_next_seq",
        "_recent_evicted",
        "ghosts_since",
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
        # Evicted ids in seq order from `ghosts_since` (None: not remembering), the first seq
        # of each, and the last few evicted (seq, id) whenever it happened.
        self._ghosts: deque[str | None] = deque()
        self._ghost_first: dict[str, int] = {}
        self._ghost_bytes = 0
        self.ghosts_since: int | None = None
        self._recent_evicted: deque[tuple[int, str | None]] = deque(maxlen=RECENT_EVICTED)

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
            self._recent_evicted.append((seq, event_id))
            if self.ghosts_since is not None:
                self._ghost(seq, event_id)
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

    # --- ghosts ----------------------------------------------------------------------

    def remember_evicted(self, on: bool) -> None:
        """Start remembering evicted ids (a catch-up began), or forget them (none is left)."""
        if on:
            if self.ghosts_since is None:
                self.ghosts_since = self.front
        else:
            self.ghosts_since = None
            self._ghosts.clear()
            self._ghost_first.clear()
            self._ghost_bytes = 0

    def _ghost(self, seq: int, event_id: str | None) -> None:
        ghosts = self._ghosts
        if self.ghosts_since is None or seq != self.ghosts_since + len(ghosts):
            return  # not contiguous (a bridge moved the front back): keep what is sound
        ghosts.append(event_id)
        if event_id:
            self._ghost_first.setdefault(event_id, seq)
            self._ghost_bytes += len(event_id)
        limit = max(GHOST_EVENTS_PER_RING_EVENT * self._limits.events, MIN_GHOST_EVENTS)
        # Bounded by count, and their ids by the ring's own byte bound.
        while ghosts and (len(ghosts) > limit or self._ghost_bytes > self._limits.bytes):
            old = ghosts.popleft()
            if old:
                self._ghost_bytes -= len(old)
                if self._ghost_first.get(old) == self.ghosts_since:
                    del self._ghost_first[old]  # (a repeated id keeps no later ghost: rare)
            self.ghosts_since += 1

    def _id_at(self, seq: int) -> tuple[bool, str | None]:
        """(True, the id) of what the topic carried at `seq` (an entry, a ghost, the last
        evicted), or (False, None) if the ring does not remember."""
        front = self.front
        if front <= seq < self._next_seq:
            return True, self._entries[seq - front][1]
        since = self.ghosts_since
        if since is not None and since <= seq < since + len(self._ghosts):
            return True, self._ghosts[seq - since]
        recent = self._recent_evicted
        if recent and recent[0][0] <= seq <= recent[-1][0]:
            for evicted_seq, evicted_id in recent:  # seqs ascend, with a hole where a bridge
                if evicted_seq == seq:  # moved the front back: a short scan, and a rare one
                    return True, evicted_id
        return False, None

    def predecessor(self, event_id: str) -> tuple[str, str | None]:
        """What the topic carried right before the first `event_id`:

        ("known", its id, None for one without) — from an entry, a ghost or an anchor;
        ("unknown", None) — the topic carried `event_id` but does not know what came before;
        ("unseen", None) — the topic never carried `event_id`, as far as it remembers.
        """
        seq = self._carried_at(event_id)
        if seq is None:
            return "unseen", None
        # Back over events without an id (pings, say), which a replay may well leave out.
        for _ in range(PREDECESSOR_WALK):
            anchor = next((a for a, s in self._anchors.items() if s == seq), None)
            if anchor is not None:
                return "known", anchor
            known, previous = self._id_at(seq - 1)
            if not known:
                break
            if previous:
                return "known", previous
            seq -= 1
        return "unknown", None

    def _carried_at(self, event_id: str) -> int | None:
        seq = self._first.get(event_id)
        if seq is None:
            seq = self._ghost_first.get(event_id)
        if seq is None:
            seq = next((s for s, i in self._recent_evicted if i == event_id), None)
        return seq

    def carried(self, event_id: str) -> bool:
        """Whether the topic carried `event_id` as far as the ring remembers (an entry, a
        ghost, a recent eviction, a position)."""
        return (
            self._carried_at(event_id) is not None
            or event_id in self._anchors
            or event_id == self.newest_id
        )

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

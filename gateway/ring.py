"""A topic's replay ring: recent events as wire bytes, found by id.

Bounded three ways (per route): a count, a byte total and an age, so the
memory a topic holds is at most `ring_bytes` (plus one entry's bookkeeping per
event, bounded by `ring_events`). Entries keep the bytes the hub already
encoded for the live write, so a replay re-encodes nothing.

Ids are opaque strings with no order; the ring finds them through an index
of the last entry carrying each id. Events without an id are kept too: they
belong to the replay of any earlier id. An *anchor* is an entry with an id
and no bytes: where a topic's upstream was resumed from a client's
Last-Event-ID, that id is anchored so clients holding it replay from there.
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
    __slots__ = ("_bytes", "_entries", "_first_seq", "_index", "_limits", "_next_seq")

    def __init__(self, limits: RingLimits) -> None:
        self._limits = limits
        # (seq, id, wire bytes, time appended)
        self._entries: deque[tuple[int, str | None, bytes, float]] = deque()
        self._index: dict[str, int] = {}
        self._bytes = 0
        self._next_seq = 0
        self._first_seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, event_id: str | None, data: bytes, now: float) -> None:
        if self._limits.events <= 0:
            return
        seq = self._next_seq
        self._next_seq += 1
        self._entries.append((seq, event_id, data, now))
        self._bytes += len(data)
        if event_id:
            self._index[event_id] = seq
        self._trim(now)

    def anchor(self, event_id: str, now: float) -> None:
        """Mark `event_id` as the point the topic's upstream resumed from."""
        self.append(event_id, b"", now)

    def _trim(self, now: float) -> None:
        limits = self._limits
        oldest = now - limits.seconds
        entries = self._entries
        while entries and (
            len(entries) > limits.events or self._bytes > limits.bytes or entries[0][3] < oldest
        ):
            seq, event_id, data, _ = entries.popleft()
            self._bytes -= len(data)
            if event_id and self._index.get(event_id) == seq:
                del self._index[event_id]
        self._first_seq = entries[0][0] if entries else self._next_seq

    def has(self, event_id: str, now: float) -> bool:
        self._trim(now)
        return event_id in self._index

    def after(self, event_id: str, now: float) -> list[bytes] | None:
        """Wire bytes of every event after `event_id`, or None when the ring does not hold it."""
        self._trim(now)
        seq = self._index.get(event_id)
        if seq is None:
            return None
        start = seq - self._first_seq + 1
        entries = self._entries
        return [entries[i][2] for i in range(start, len(entries)) if entries[i][2]]

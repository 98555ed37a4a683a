"""The Server-Sent Events wire format: an incremental parser and an encoder.

This module owns every byte of ``text/event-stream`` the gateway reads or writes. It does no
I/O and knows nothing about sockets, asyncio or the rest of the project (h11 style): the caller
pushes bytes into a `Parser` and gets `Event` objects back, and turns `Event` objects into bytes
with `encode`. Keeping it pure makes it trivially testable byte by byte and reusable on both
sides of the proxy.

Parsing follows the WHATWG HTML Living Standard, section 9.2.6 "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

* The stream is UTF-8; invalid sequences decode to U+FFFD. Exactly one U+FEFF BOM is stripped,
  and only at the very start of the stream (a later or second BOM is data).
* Lines end with CRLF, LF or CR. A CR ends its line at once; an LF right after it, even one
  arriving in the next `Parser.feed` call, is part of the same line end.
* A blank line dispatches the pending event: if the data buffer is empty, the data and event
  type buffers are reset and nothing is dispatched; otherwise the data buffer loses its final
  LF and the event goes out with its type ("message" if none was set).
* A line starting with ":" is a comment. Otherwise the field name is everything before the
  first ":", the value everything after it with one leading space removed; a line without ":"
  is a field with an empty value.
* ``event`` sets the type buffer; ``data`` appends value + LF to the data buffer; ``id`` sets
  the last event ID buffer unless the value contains U+0000 (then the line is ignored);
  ``retry`` sets the reconnection time only if the value is non-empty and all ASCII digits;
  any other field is ignored.
* At end of stream (`Parser.close`) an event without its terminating blank line is discarded,
  along with any unterminated line.

Deliberate additions to the spec, all there so a hostile or broken upstream cannot make the
gateway hold unbounded memory:

* A line longer than ``max_line_bytes`` (raw bytes, without its line end) is never buffered:
  its bytes are thrown away up to its line end. If it is not a comment, the event it belongs to
  is marked oversize. Comments are exempt because the spec ignores them anyway, so discarding
  one loses nothing and must not cost the event that follows.
* An event whose data (as it would be dispatched, measured in UTF-8 bytes) exceeds
  ``max_event_bytes`` is marked oversize and its data freed at once.
* An oversize event is dropped at its dispatching blank line and counted in
  `Parser.oversize_events`; the stream carries on normally after it. ``id`` and ``retry`` lines
  inside it still take effect: they were applied as they arrived.

`Event.id` is not in the spec's model: it is the value of the last valid ``id`` line inside the
event's own block, so a proxy can tell an event that set an id (and must forward it) from one
that merely inherits the last event ID buffer.

A block that sets an id but dispatches nothing (no ``data`` line, or an oversize event) still
changes what a reader sends back as ``Last-Event-ID``, so a proxy must pass it on: `feed`
returns it as an `Event` with ``dispatch=False`` (its data and type mean nothing), and `encode`
writes it as the ``id`` line and the blank line alone. A block with neither data nor an id
changes nothing a reader can observe (its type is reset, its retry already applied) and is not
returned.

`Parser.last_event_id` is the spec's "last event ID string" (what a client sends as
``Last-Event-ID`` when it reconnects): an ``id`` line only sets the private buffer, and the
buffer is committed at the block's blank line (dispatch step 1, which runs even when no event
is dispatched). An id inside a block cut off by the end of the stream is therefore never
committed, so a reconnect resumes before that lost event, not after it.

Invariants the rest of the gateway relies on: `Parser.feed` never raises, whatever the bytes
and however they are split, and splitting never changes the result; between calls the parser's
line buffer holds at most ``max_line_bytes`` (during a call, at most one `Parser.feed` argument
more); for every `Event` the encoder accepts, a spec parser reads ``encode(event)`` back as the
same `Event` (with CR and CRLF inside ``data`` turned into LF, since the format cannot carry
them). The only exception this module raises is `EncodeError`, from the encoder (apart from
`ValueError` for negative limits given to `Parser`, a programming error caught at once).

Cost: each byte is scanned a constant number of times by C code (``rfind``/``in``/``decode``/
``split`` over whole chunks); an incomplete line is kept in a ``bytearray`` and only the newly
arrived bytes are searched, so a long line arriving in many small pieces is never rescanned and
the total work is O(bytes). Python-level work is O(lines): one loop iteration per line, none per
byte. When a chunk has no CR (the usual ``\\n``-only stream) the CR normalisation pass is
skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "EncodeError",
    "Event",
    "Parser",
    "SSEError",
    "encode",
    "encode_comment",
    "encode_many",
    "encode_retry",
]

# Real SSE lines are short (JSON payloads of a few KiB at most); 64 KiB leaves generous room
# while bounding what one never-ending line can make us buffer per upstream connection.
DEFAULT_MAX_LINE_BYTES: int = 64 * 1024

# One event is held whole before it is dispatched, and the gateway may hold several per topic in
# fan-out queues; 1 MiB is far above any sane event and low enough that many topics fit in RAM.
DEFAULT_MAX_EVENT_BYTES: int = 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event.

    ``id`` is the value of the last valid ``id`` line inside this event's block: ``""`` means the
    block reset the last event ID, ``None`` means the block had no valid ``id`` line.
    ``dispatch=False``: a block that only set ``id`` (see the module docstring).
    """

    data: str
    event: str = "message"
    id: str | None = None
    dispatch: bool = True


class SSEError(Exception):
    """Base of the errors this module raises."""


class EncodeError(SSEError, ValueError):
    """An `Event` (or retry/comment) that cannot be written so a parser reads it back unchanged."""


class Parser:
    """Incremental ``text/event-stream`` parser: push bytes with `feed`, get complete events.

    The parser may be reused after `close` for the next connection of the same logical stream
    (a reconnect): `last_event_id` and `retry_ms` carry over, everything else starts afresh,
    including BOM stripping. The next stream's id buffer starts from `last_event_id`, as
    browsers do, so events without an id line keep the id they would have had.
    """

    __slots__ = (
        "_at_start",
        "_block_id",
        "_buf",
        "_data",
        "_data_size",
        "_discarding",
        "_event_type",
        "_id_buffer",
        "_max_event_bytes",
        "_max_line_bytes",
        "_oversize",
        "_skip_lf",
        "last_event_id",
        "oversize_events",
        "retry_ms",
    )

    last_event_id: str
    _id_buffer: str
    retry_ms: int | None
    oversize_events: int
    _buf: bytearray
    _at_start: bool
    _skip_lf: bool
    _discarding: bool
    # The pending event: data lines (joined with LF at dispatch), their size, type, block id.
    _data: list[str]
    _data_size: int
    _event_type: str
    _block_id: str | None
    _oversize: bool

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        last_event_id: str = "",
    ) -> None:
        """`last_event_id` starts the stream as if that id had been received (a resume)."""
        if max_line_bytes < 0 or max_event_bytes < 0:
            raise ValueError("SSE parser limits must not be negative")
        self._max_line_bytes = max_line_bytes
        self._max_event_bytes = max_event_bytes
        # The spec's "last event ID string" (committed at blank lines) and "last event ID
        # buffer" (set by id lines); both survive dispatches.
        self.last_event_id = last_event_id
        self._id_buffer = last_event_id
        self.retry_ms = None
        self.oversize_events = 0
        # Holds only the current incomplete line, which never contains CR or LF; that is what
        # lets feed() search just the newly arrived bytes.
        self._buf = bytearray()
        self._at_start = True
        self._skip_lf = False
        self._discarding = False
        self._reset_event()

    def _reset_event(self) -> None:
        self._data = []
        self._data_size = 0
        self._event_type = ""
        self._block_id = None
        self._oversize = False

    def close(self) -> None:
        """End of stream: drop the unterminated line and event, keep last_event_id and retry_ms.

        An id line of the dropped event was never committed, so it is forgotten too.
        """
        self._id_buffer = self.last_event_id
        self._buf.clear()
        self._at_start = True
        self._skip_lf = False
        self._discarding = False
        self._reset_event()

    def feed(self, data: bytes) -> list[Event]:
        """Push the next bytes of the stream; return every event they complete (maybe none)."""
        if not data:
            return []
        buf = self._buf
        if self._at_start:
            # The BOM may arrive split over feeds, so hold up to two bytes that could still
            # turn out to be one; buf holds nothing else while we are at the start.
            head = bytes(buf) + data
            if len(head) < 3 and _BOM.startswith(head):
                buf[:] = head
                return []
            self._at_start = False
            buf.clear()
            data = head[3:] if head.startswith(_BOM) else head
            if not data:
                return []
        if self._skip_lf:
            # The previous feed ended on a CR: a leading LF here completes that CRLF.
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
                if not data:
                    return []
        if self._discarding:
            lf = data.find(b"\n")
            cr = data.find(b"\r")
            if lf < 0 and cr < 0:
                return []
            self._discarding = False
            if cr < 0 or 0 <= lf < cr:
                data = data[lf + 1 :]
            elif cr + 1 == len(data):
                self._skip_lf = True
                return []
            else:
                data = data[cr + 2 :] if data[cr + 1] == _LF else data[cr + 1 :]
            if not data:
                return []

        # buf has no line end in it (invariant), so only the new bytes need searching.
        cr = data.rfind(b"\r")
        end = max(data.rfind(b"\n"), cr)
        if end < 0:
            buf += data
            if len(buf) > self._max_line_bytes:
                self._drop_overlong_tail()
            return []
        end += len(buf)
        buf += data
        if end + 1 == len(buf):
            chunk = buf
            self._buf = buf = bytearray()
            # A CR as the very last byte: the LF that may complete it comes in the next feed.
            self._skip_lf = chunk[end] == _CR
        else:
            # The bytes after the last line end contain no LF, so a CR at `end` needs no care.
            chunk = buf[: end + 1]
            del buf[: end + 1]
        events = self._process(self._split_lines(chunk, cr >= 0))
        if len(buf) > self._max_line_bytes:
            self._drop_overlong_tail()
        return events

    def _drop_overlong_tail(self) -> None:
        buf = self._buf
        if buf[0] != _COLON:
            self._oversize = True
        buf.clear()
        self._discarding = True

    def _split_lines(self, chunk: bytearray, has_cr: bool) -> Sequence[str | None]:
        """Decode the complete lines in `chunk` (which ends with a line end); None = overlong."""
        if has_cr:
            # Order matters: CRLF first, so "\r\r\n" is CR + CRLF, two line ends, as specified.
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        limit = self._max_line_bytes
        if len(chunk) > limit:
            raw = chunk.split(b"\n")
            raw.pop()
            if max(map(len, raw)) > limit:
                # Rare: decode line by line so overlong lines never become str. An overlong
                # comment becomes ":" (still a comment, still ignored, no harm to the event).
                return [
                    line.decode("utf-8", "replace")
                    if len(line) <= limit
                    else (":" if line[0] == _COLON else None)
                    for line in raw
                ]
        # Decoding the whole chunk at once equals decoding line by line: LF is ASCII and can
        # never be part of a multi-byte sequence, so it always ends any invalid run before it.
        lines = chunk.decode("utf-8", "replace").split("\n")
        lines.pop()
        return lines

    def _process(self, lines: Sequence[str | None]) -> list[Event]:
        events: list[Event] = []
        # Hot loop: parser state lives in locals and is written back once at the end.
        data = self._data
        size = self._data_size
        event_type = self._event_type
        block_id = self._block_id
        id_buffer = self._id_buffer
        oversize = self._oversize
        # `size` counts the UTF-8 bytes of the data buffer including the final LF that
        # dispatch strips, hence the + 1.
        size_limit = self._max_event_bytes + 1
        for line in lines:
            if line:
                if line[0] == ":":
                    continue
                name, _, value = line.partition(":")
                if value[:1] == " ":
                    value = value[1:]
                if name == "data":
                    if not oversize:
                        size += (len(value) if value.isascii() else len(value.encode())) + 1
                        if size > size_limit:
                            oversize = True
                            data = []
                        else:
                            data.append(value)
                elif name == "id":
                    if "\x00" not in value:
                        id_buffer = block_id = value
                elif name == "event":
                    event_type = value
                elif name == "retry" and value.isascii() and value.isdigit():
                    # More digits than int() accepts (sys.get_int_max_str_digits) mean no
                    # meaningful delay, so such a value is ignored like any other invalid one.
                    with suppress(ValueError):
                        self.retry_ms = int(value)
            elif line is None:
                oversize = True
            else:
                # Dispatch step 1: commit the id, whether or not an event follows.
                self.last_event_id = id_buffer
                if oversize:
                    self.oversize_events += 1
                if data and not oversize:
                    events.append(Event("\n".join(data), event_type or "message", block_id))
                elif block_id is not None:
                    events.append(Event("", id=block_id, dispatch=False))
                data = []
                size = 0
                event_type = ""
                block_id = None
                oversize = False
        self._data = data
        self._data_size = size
        self._event_type = event_type
        self._block_id = block_id
        self._id_buffer = id_buffer
        self._oversize = oversize
        return events


def _check_field(what: str, value: str, *, nul: bool = False) -> None:
    if "\r" in value or "\n" in value or (not nul and "\x00" in value):
        # A line end would let the value inject fields or end the event early; a NUL id is
        # silently ignored by clients. Either way the reader would see something else.
        raise EncodeError(f"SSE {what} must not contain CR, LF or NUL: {value[:80]!r}")


def encode(event: Event) -> bytes:
    """Return the wire bytes of one event, ending with the blank line that dispatches it.

    ``data`` is split on CRLF, CR and LF into one ``data:`` line per line, so CR and CRLF come
    back as LF: the format has no way to carry them. ``event`` is omitted when it is "message"
    (the reader's default). An empty ``event`` is refused rather than written: the reader would
    return it as "message", so the round trip would not hold. ``id`` is written only when not
    None; ``""`` becomes a bare ``id`` line, which resets the reader's last event ID.

    An event with ``dispatch=False`` is its ``id`` line and a blank line: it sets the reader's
    last event ID and dispatches nothing.

    Raises EncodeError for CR or LF in ``event`` or ``id``, NUL in ``id`` (a reader ignores such
    an id line; NUL in a type is valid and kept), an empty ``event``, a ``dispatch=False`` event
    without an id, or text that is not encodable as UTF-8 (lone surrogates).
    """
    if not event.dispatch:
        if event.id is None:
            raise EncodeError("an SSE block that dispatches nothing must set an id")
        _check_field("id", event.id)
        text = "id: " + event.id + "\n\n" if event.id else "id\n\n"
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError(f"SSE id is not encodable as UTF-8: {exc.reason}") from None
    text = event.data
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in text:
        text = text.replace("\n", "\ndata: ")
    text = "data: " + text + "\n\n"
    if event.id is not None:
        _check_field("id", event.id)
        text = ("id: " + event.id + "\n" if event.id else "id\n") + text
    if event.event != "message":
        if not event.event:
            raise EncodeError('SSE event type must not be empty (it would read back as "message")')
        _check_field("event type", event.event, nul=True)
        text = "event: " + event.event + "\n" + text
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"SSE event is not encodable as UTF-8: {exc.reason}") from None


def encode_many(events: Iterable[Event]) -> bytes:
    """Return the wire bytes of several events, for a single write."""
    return b"".join(map(encode, events))


def encode_retry(ms: int) -> bytes:
    """Return a ``retry`` field telling readers to wait `ms` milliseconds before reconnecting.

    It ends with a blank line, which dispatches nothing on its own; write it only between events.
    """
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise EncodeError(f"SSE retry must be a non-negative int, got {ms!r}")
    return b"retry: %d\n\n" % ms


def encode_comment(text: str = "") -> bytes:
    """Return a comment line (a keep-alive that readers ignore) and a blank line.

    Like `encode_retry`, write it only between events: its blank line would dispatch a partly
    written event.
    """
    if not text:
        return b":\n\n"
    _check_field("comment", text)
    try:
        return b": " + text.encode("utf-8") + b"\n\n"
    except UnicodeEncodeError as exc:
        raise EncodeError(f"SSE comment is not encodable as UTF-8: {exc.reason}") from None

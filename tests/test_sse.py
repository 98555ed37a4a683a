"""Tests for gateway.sse: the spec's parsing rules, the memory limits, and the encoder round trip.

Every table case is fed whole, one byte at a time and at random split points, because the
parser's job is to give the same answer however the network happens to cut the stream.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from collections.abc import Iterable, Iterator
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import (
    DEFAULT_MAX_LINE_BYTES,
    EncodeError,
    Event,
    Parser,
    SSEError,
    encode,
    encode_comment,
    encode_many,
    encode_retry,
)

BOM = b"\xef\xbb\xbf"
FEED_MODES = ["whole", "bytewise", "random-1", "random-2", "random-3"]


def chunks_for(stream: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [stream]
    if mode == "bytewise":
        return [stream[i : i + 1] for i in range(len(stream))]
    rng = random.Random(f"{mode}:{stream!r}")
    cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream) + 1, rng.randint(1, 6))))
    return split_at(stream, cuts)


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in pairwise(edges)]


def feed_all(parser: Parser, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    parser.close()
    return events


def parse(stream: bytes, mode: str = "whole", **limits: int) -> tuple[list[Event], Parser]:
    parser = Parser(**limits)  # type: ignore[arg-type]  # only the size limits pass here
    return feed_all(parser, chunks_for(stream, mode)), parser


def reference_parse(stream: bytes) -> tuple[list[Event], str, int | None]:
    """A deliberately naive, character-at-a-time reading of the spec, to check Parser against.

    It decodes the whole stream at once, so it also checks that Parser's line-by-line decoding
    gives the same text.
    """
    if stream.startswith(BOM):
        stream = stream[3:]
    text = stream.decode("utf-8", "replace")
    lines: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] in "\r\n":
            lines.append(text[start:i])
            if text[i] == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
            start = i + 1
        i += 1
    events: list[Event] = []
    # last_id is the spec's "last event ID string", committed at each blank line (dispatch
    # step 1); id_buffer is its "last event ID buffer", set by id lines.
    data = event_type = last_id = id_buffer = ""
    block_id: str | None = None
    retry: int | None = None
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data:
                events.append(Event(data.removesuffix("\n"), event_type or "message", block_id))
            elif block_id is not None:  # it moved the last event id: a proxy passes it on
                events.append(Event("", id=block_id, dispatch=False))
            data = event_type = ""
            block_id = None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            id_buffer = block_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events, last_id, retry


# --- The spec's rules, table-driven ---------------------------------------------------------

E = Event
CASES: list[tuple[str, bytes, list[Event], str, int | None]] = [
    # (id, stream, events, last_event_id after, retry_ms after)
    ("lf", b"data: a\n\n", [E("a")], "", None),
    ("cr", b"data: a\r\r", [E("a")], "", None),
    ("crlf", b"data: a\r\n\r\n", [E("a")], "", None),
    (
        "mixed-endings",
        b"data: a\rdata: b\ndata: c\r\n\r\ndata: d\n\r\n",
        [E("a\nb\nc"), E("d")],
        "",
        None,
    ),
    ("cr-then-crlf-is-two-line-ends", b"data: a\r\r\ndata: b\n\n", [E("a"), E("b")], "", None),
    ("lf-then-cr-is-two-line-ends", b"data: a\n\rdata: b\n\n", [E("a"), E("b")], "", None),
    ("bom-stripped", BOM + b"data: a\n\n", [E("a")], "", None),
    ("second-bom-is-part-of-field-name", BOM + BOM + b"data: a\n\ndata: b\n\n", [E("b")], "", None),
    ("bom-in-value-is-data", BOM + b"data: " + BOM + b"a\n\n", [E("\ufeffa")], "", None),
    ("bom-not-at-start-is-data", b"data: a\n\n" + BOM + b"data: b\n\n", [E("a")], "", None),
    ("bom-prefix-only-is-invalid-utf8", b"\xef\xbbdata: a\n\ndata: b\n\n", [E("b")], "", None),
    ("comments-ignored", b": hello\ndata: a\n:\n: data: b\n\n", [E("a")], "", None),
    ("comment-only-block-no-event", b": ping\n\n", [], "", None),
    ("field-without-colon", b"data\n\n", [E("")], "", None),
    ("data-colon-no-space", b"data:\n\n", [E("")], "", None),
    ("data-colon-space", b"data: \n\n", [E("")], "", None),
    ("data-no-space-value", b"data:x\n\n", [E("x")], "", None),
    ("only-one-space-stripped", b"data:  x\n\n", [E(" x")], "", None),
    ("tab-not-stripped", b"data:\tx\n\n", [E("\tx")], "", None),
    ("colons-in-value-kept", b"data: a:b: c\n\n", [E("a:b: c")], "", None),
    ("multi-line-data", b"data: a\ndata: b\ndata:\n\n", [E("a\nb\n")], "", None),
    ("data-then-empty-line", b"data\ndata\n\n", [E("\n")], "", None),
    ("default-event-type", b"data: a\n\n", [E("a", "message")], "", None),
    ("custom-event-type", b"event: add\ndata: 1\n\n", [E("1", "add")], "", None),
    (
        "event-type-reset-after-dispatch",
        b"event: add\ndata: 1\n\ndata: 2\n\n",
        [E("1", "add"), E("2")],
        "",
        None,
    ),
    ("event-type-reset-by-empty-block", b"event: add\n\ndata: 1\n\n", [E("1")], "", None),
    ("empty-event-type-is-message", b"event\ndata: 1\n\n", [E("1")], "", None),
    ("last-event-line-wins", b"event: a\nevent: b\ndata: 1\n\n", [E("1", "b")], "", None),
    ("id-set", b"id: 1\ndata: a\n\n", [E("a", id="1")], "1", None),
    (
        "id-with-nul-ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [E("a", id="1"), E("b")],
        "1",
        None,
    ),
    (
        "empty-id-resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [E("a", id="1"), E("b", id="")],
        "",
        None,
    ),
    (
        "empty-id-colon-resets",
        b"id: 1\ndata: a\n\nid:\ndata: b\n\n",
        [E("a", id="1"), E("b", id="")],
        "",
        None,
    ),
    (
        "id-persists-but-only-in-own-block",
        b"id: 7\ndata: a\n\ndata: b\n\n",
        [E("a", id="7"), E("b")],
        "7",
        None,
    ),
    (
        "id-in-block-without-data",
        b"id: 5\n\ndata: a\n\n",
        [E("", id="5", dispatch=False), E("a")],
        "5",
        None,
    ),
    ("id-reset-without-data", b"id\n\n", [E("", id="", dispatch=False)], "", None),
    ("nul-in-event-type-kept", b"event: a\x00b\ndata: x\n\n", [E("x", "a\x00b")], "", None),
    ("last-id-line-in-block-wins", b"id: 1\nid: 2\ndata: a\n\n", [E("a", id="2")], "2", None),
    ("id-keeps-spaces", b"id:  a b \ndata: x\n\n", [E("x", id=" a b ")], " a b ", None),
    ("retry-digits", b"retry: 10\n\n", [], "", 10),
    ("retry-no-space", b"retry:2500\n", [], "", 2500),
    ("retry-leading-zeros", b"retry: 007\n", [], "", 7),
    ("retry-letters-ignored", b"retry: 1a\n", [], "", None),
    ("retry-negative-ignored", b"retry: -1\n", [], "", None),
    ("retry-empty-ignored", b"retry:\nretry\n", [], "", None),
    ("retry-two-spaces-ignored", b"retry:  10\n", [], "", None),
    ("retry-arabic-indic-digit-ignored", "retry: \u0661\n".encode(), [], "", None),
    ("retry-fullwidth-digit-ignored", "retry: \uff11\n".encode(), [], "", None),
    ("retry-superscript-ignored", "retry: \u00b2\n".encode(), [], "", None),
    ("retry-invalid-keeps-previous", b"retry: 10\nretry: x\n", [], "", 10),
    ("retry-in-event-block", b"retry: 5\ndata: a\n\n", [E("a")], "", 5),
    # Kept exact however long: bounding it is the reader's policy (the upstream client caps it
    # at reconnect_max_seconds), and converting it to seconds would overflow a float.
    ("retry-309-digits-kept-exact", b"retry: " + b"9" * 309 + b"\n", [], "", int("9" * 309)),
    ("retry-10**400-kept-exact", b"retry: %d\n" % 10**400, [], "", 10**400),
    ("unknown-field-ignored", b"foo: bar\ndata: a\nfoo\n\n", [E("a")], "", None),
    ("field-names-case-sensitive", b"Data: a\nDATA: b\n\n", [], "", None),
    ("space-before-colon-is-other-field", b"data : a\n\n", [], "", None),
    (
        "no-data-no-dispatch",
        b"event: x\nid: 3\nretry: 1\n\n",
        [E("", id="3", dispatch=False)],
        "3",
        1,
    ),
    ("no-data-no-id-nothing", b"event: x\nretry: 1\n\n", [], "", 1),
    ("unterminated-event-dropped", b"data: a\n\ndata: b\n", [E("a")], "", None),
    ("unterminated-line-dropped", b"data: a\n\ndata: b", [E("a")], "", None),
    ("unterminated-id-line-not-applied", b"id: 5", [], "", None),
    ("invalid-utf8-replaced", b"data: \xff\xfe a\xc3\n\n", [E("\ufffd\ufffd a\ufffd")], "", None),
    (
        "truncated-sequence-before-cr",
        b"data: \xe2\x82\rdata: \xe2\x82\xac\r\r",
        [E("\ufffd\n\u20ac")],
        "",
        None,
    ),
    ("nul-in-data-kept", b"data: a\x00b\n\n", [E("a\x00b")], "", None),
    (
        "unicode",
        "event: \u00e9v\ndata: h\u00e9llo \u2713 \U0001f600\n\n".encode(),
        [E("h\u00e9llo \u2713 \U0001f600", "\u00e9v")],
        "",
        None,
    ),
    (
        "non-lf-unicode-line-breaks-are-data",
        "data: a\u2028b\x85c\x0bd\n\n".encode(),
        [E("a\u2028b\x85c\x0bd")],
        "",
        None,
    ),
    ("blank-lines-only", b"\n\n\r\n\r\r", [], "", None),
]


@pytest.mark.parametrize("mode", FEED_MODES)
@pytest.mark.parametrize(
    ("stream", "expected", "last_event_id", "retry_ms"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_spec_case(
    stream: bytes, expected: list[Event], last_event_id: str, retry_ms: int | None, mode: str
) -> None:
    events, parser = parse(stream, mode)
    assert events == expected
    assert parser.last_event_id == last_event_id
    assert parser.retry_ms == retry_ms
    assert parser.oversize_events == 0
    # The naive reference agrees, so the table and the reference check each other.
    assert reference_parse(stream) == (expected, last_event_id, retry_ms)


def test_cr_ends_line_without_waiting_for_next_chunk() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    # The blank line is a lone CR at the end of the chunk: the event must come out now.
    assert parser.feed(b"\r") == [Event("a")]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF completes the CRLF: not a blank line
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\ndata: c\r") == []
    assert parser.feed(b"\n\r") == [Event("a\nb\nc")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: d\n\n") == [Event("d")]


def test_cr_before_empty_chunk_still_swallows_following_lf() -> None:
    parser = Parser()
    parser.feed(b"data: a\r")
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [Event("a")]


def test_bom_split_across_feeds() -> None:
    parser = Parser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\xbb") == []
    assert parser.feed(b"\xbfdata: a\n\n") == [Event("a")]


def test_events_come_out_of_the_feed_that_completes_them() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\n\ndata: b\n\nda") == [Event("a"), Event("b")]
    assert parser.feed(b"ta: c\n") == []
    assert parser.feed(b"\n") == [Event("c")]


def test_retry_with_more_digits_than_int_accepts_is_ignored_and_keeps_the_previous() -> None:
    digits = sys.get_int_max_str_digits()
    if not digits:
        pytest.skip("int() has no digit limit in this interpreter")
    parser = Parser()
    assert parser.feed(b"retry: 7\nretry: " + b"9" * (digits + 1) + b"\ndata: a\n\n") == [E("a")]
    assert parser.retry_ms == 7


def test_close_drops_pending_and_keeps_id_and_retry() -> None:
    parser = Parser()
    parser.feed(b"retry: 300\nid: 4\ndata: a\n\nid: 5\ndata: partial\n")
    # Before the blank line the id is only buffered: a reconnect now must resume after 4,
    # or the cut-off event 5 would be skipped by the upstream and lost.
    assert parser.last_event_id == "4"
    parser.close()
    assert parser.last_event_id == "4"
    assert parser.retry_ms == 300
    # The next stream (a reconnect) starts clean: the partial event is gone, a BOM is stripped.
    assert parser.feed(b"\n") == []
    parser.close()
    assert parser.feed(BOM + b"data: b\n\n") == [Event("b")]
    assert parser.last_event_id == "4"


def test_id_is_committed_at_the_blank_line_even_without_data() -> None:
    parser = Parser()
    parser.feed(b"id: 7\n")
    assert parser.last_event_id == ""
    assert parser.feed(b"\n") == [Event("", id="7", dispatch=False)]  # nothing dispatched
    assert parser.last_event_id == "7"
    parser.feed(b"id\n\n")  # an empty id resets, at its blank line
    assert parser.last_event_id == ""


def test_close_resets_cr_state() -> None:
    parser = Parser()
    parser.feed(b"data: a\n\r")
    parser.close()
    # A new stream starting with LF has a blank line there; no leftover CR may swallow it.
    assert parser.feed(b"data: b\n") == []
    assert parser.feed(b"\n") == [Event("b")]


def test_event_defaults_and_immutability() -> None:
    event = Event("x")
    assert event == Event("x", "message", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]


def test_negative_limits_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        Parser(max_line_bytes=-1)
    with pytest.raises(ValueError, match="negative"):
        Parser(max_event_bytes=-1)


# --- Limits ---------------------------------------------------------------------------------

CHUNK_SIZES = [0, 1, 3, 7, 64]  # 0 = whole


def chunked(stream: bytes, size: int) -> list[bytes]:
    if size == 0:
        return [stream]
    return [stream[i : i + size] for i in range(0, len(stream), size)]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_oversize_line_dropped_and_counted(size: int, eol: bytes) -> None:
    long_line = b"data: " + b"x" * 100
    stream = b"data: a" + eol + long_line + eol + b"data: b" + eol + eol + b"data: ok" + eol + eol
    parser = Parser(max_line_bytes=16)
    assert feed_all(parser, chunked(stream, size)) == [Event("ok")]
    assert parser.oversize_events == 1


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_line_at_limit_kept_one_over_dropped(size: int) -> None:
    at_limit = b"data: " + b"x" * 10  # 16 bytes
    stream = at_limit + b"\n\n" + at_limit + b"y\n\n"
    parser = Parser(max_line_bytes=16)
    assert feed_all(parser, chunked(stream, size)) == [Event("x" * 10)]
    assert parser.oversize_events == 1


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_oversize_comment_is_discarded_without_dropping_the_event(size: int) -> None:
    # Comments are ignored anyway, so an overlong one costs nothing and must not cost the event.
    stream = b": " + b"x" * 100 + b"\ndata: a\n\n"
    parser = Parser(max_line_bytes=16)
    assert feed_all(parser, chunked(stream, size)) == [Event("a")]
    assert parser.oversize_events == 0


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_id_and_retry_inside_oversize_event_still_apply(size: int) -> None:
    stream = b"id: 9\nretry: 5\ndata: " + b"x" * 100 + b"\nid: 10\n\ndata: next\n\n"
    parser = Parser(max_line_bytes=16)
    # The event is dropped; its id still moves a reader's last event id, so it is passed on.
    assert feed_all(parser, chunked(stream, size)) == [
        Event("", id="10", dispatch=False),
        Event("next"),
    ]
    assert parser.oversize_events == 1
    assert parser.last_event_id == "10"
    assert parser.retry_ms == 5


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_oversize_event_from_many_small_lines(size: int) -> None:
    stream = b"data: abc\n" * 50 + b"\ndata: ok\n\n"
    parser = Parser(max_event_bytes=100)
    assert feed_all(parser, chunked(stream, size)) == [Event("ok")]
    assert parser.oversize_events == 1


def test_overlong_tail_after_complete_lines_is_not_kept() -> None:
    parser = Parser(max_line_bytes=16)
    assert parser.feed(b"data: a\n\ndata: " + b"x" * 100) == [Event("a")]
    # Private attribute, checked on purpose: the overlong start of a line must not be held.
    assert len(parser._buf) <= 16
    assert parser.feed(b"x\n\ndata: b\n\n") == [Event("b")]
    assert parser.oversize_events == 1


def test_oversize_event_buffer_is_freed_immediately() -> None:
    parser = Parser(max_event_bytes=100)
    parser.feed(b"data: abc\n" * 50)
    # Private attribute, checked on purpose: the point is that the data is not kept around.
    assert parser._data == []


def test_event_limit_counts_dispatched_utf8_bytes() -> None:
    parser = Parser(max_event_bytes=10)
    # 4 + 1 + 5 = 10 bytes once joined with LF: at the limit, delivered.
    assert parser.feed(b"data: abcd\ndata: abcde\n\n") == [Event("abcd\nabcde")]
    # "\u00e9" is two bytes in UTF-8: 11 bytes, one over.
    assert parser.feed("data: abcd\u00e9\ndata: abcd\n\n".encode()) == []
    assert parser.oversize_events == 1
    assert parser.feed(b"data: " + b"x" * 10 + b"\n\n") == [Event("x" * 10)]


def test_zero_line_limit_keeps_only_blank_lines() -> None:
    parser = Parser(max_line_bytes=0)
    assert parser.feed(b"data: a\n\n\n:x\n\ndata: b\r\n\r\n") == []
    assert parser.oversize_events == 2


def test_oversize_pending_event_at_close_is_not_counted() -> None:
    parser = Parser(max_line_bytes=16)
    parser.feed(b"data: " + b"x" * 100 + b"\n")
    parser.close()
    assert parser.oversize_events == 0
    assert parser.feed(b"data: a\n\n") == [Event("a")]


def test_ten_megabyte_line_in_small_chunks_is_never_buffered() -> None:
    chunk_size = 1024
    parser = Parser()
    parser.feed(b"id: 1\ndata: ")
    largest = 0
    chunk = b"x" * chunk_size
    for _ in range(10 * 1024):
        assert parser.feed(chunk) == []
        # Private attribute, checked on purpose: the bound on the line buffer is the point.
        largest = max(largest, len(parser._buf))
    # Inside feed() the buffer may briefly hold one chunk on top of the limit (the bound that
    # matters, max_line_bytes + chunk_size); between calls it is back within the limit itself.
    assert largest <= DEFAULT_MAX_LINE_BYTES
    assert parser.feed(b"\n\ndata: ok\n\n") == [Event("", id="1", dispatch=False), Event("ok")]
    assert parser.oversize_events == 1
    assert parser.last_event_id == "1"


# --- Properties -----------------------------------------------------------------------------

# Surrogates (Cs) are excluded: they are not text and cannot be written as UTF-8 at all.
no_line_breaks = st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]))
events_strategy = st.builds(
    Event,
    data=st.text(st.characters(exclude_characters="\r", exclude_categories=["Cs"])),
    event=no_line_breaks.filter(bool) | st.just("message"),
    id=st.none() | no_line_breaks,
)


@st.composite
def split_points(draw: st.DrawFn, stream: bytes) -> list[int]:
    return draw(st.lists(st.integers(0, len(stream)), max_size=12))


@settings(max_examples=200, deadline=None)
@given(st.lists(events_strategy, max_size=8), st.data())
def test_round_trip_any_events_any_split(events: list[Event], draw: st.DataObject) -> None:
    stream = encode_many(events)
    cuts = draw.draw(split_points(stream))
    parser = Parser()
    assert feed_all(parser, split_at(stream, cuts)) == events
    expected_id = next((e.id for e in reversed(events) if e.id is not None), "")
    assert parser.last_event_id == expected_id


# Raw bytes biased towards the interesting tokens, so the properties hit real fields often.
TOKENS = [
    b"data", b"id", b"event", b"retry", b":", b" ", b"\n", b"\r", b"\r\n", b"x", b"1",
    b"\x00", b"\xef\xbb\xbf", b"\xef", b"\xbb", b"\xff", b"\xc3", b"\xa9", b"\xe2\x82",
]  # fmt: skip
raw_streams = st.binary(max_size=300) | st.lists(st.sampled_from(TOKENS), max_size=80).map(b"".join)


def observe(parser: Parser, chunks: Iterable[bytes]) -> tuple[list[Event], str, int | None, int]:
    events = feed_all(parser, chunks)
    return events, parser.last_event_id, parser.retry_ms, parser.oversize_events


@settings(max_examples=300, deadline=None)
@given(raw_streams, st.data())
def test_arbitrary_bytes_any_split_match_whole_and_reference(
    stream: bytes, draw: st.DataObject
) -> None:
    cuts = draw.draw(split_points(stream))
    whole = observe(Parser(), [stream])
    assert observe(Parser(), split_at(stream, cuts)) == whole
    assert whole[:3] == reference_parse(stream)


@settings(max_examples=300, deadline=None)
@given(
    raw_streams,
    st.data(),
    st.integers(0, 12),
    st.integers(0, 24),
)
def test_arbitrary_bytes_with_tight_limits_split_independent(
    stream: bytes, draw: st.DataObject, max_line: int, max_event: int
) -> None:
    cuts = draw.draw(split_points(stream))

    def parser() -> Parser:
        return Parser(max_line_bytes=max_line, max_event_bytes=max_event)

    whole = observe(parser(), [stream])
    assert observe(parser(), split_at(stream, cuts)) == whole
    assert observe(parser(), [stream[i : i + 1] for i in range(len(stream))]) == whole


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from("a\r\n\u00e9 ")), st.data())
def test_cr_and_crlf_in_data_come_back_as_lf(data: str, draw: st.DataObject) -> None:
    stream = encode(Event(data))
    cuts = draw.draw(split_points(stream))
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert feed_all(Parser(), split_at(stream, cuts)) == [Event(expected)]


# --- Encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (Event("a"), b"data: a\n\n"),
        (Event(""), b"data: \n\n"),
        (Event(" a"), b"data:  a\n\n"),
        (Event("a\nb", "x", "1"), b"event: x\nid: 1\ndata: a\ndata: b\n\n"),
        (Event("a", id=""), b"id\ndata: a\n\n"),
        (Event("a\r\nb\rc\n"), b"data: a\ndata: b\ndata: c\ndata: \n\n"),
        (
            Event("\u00e9", "\u00e9v", "\u00e9"),
            "event: \u00e9v\nid: \u00e9\ndata: \u00e9\n\n".encode(),
        ),
    ],
)
def test_encode_wire_format(event: Event, wire: bytes) -> None:
    assert encode(event) == wire


def test_encode_many_is_concatenation() -> None:
    events = [Event("a"), Event("b", "t", "2")]
    assert encode_many(events) == encode(events[0]) + encode(events[1])
    assert encode_many([]) == b""
    assert encode_many(iter(events)) == encode_many(events)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        *(("event", bad) for bad in ["\r", "\n", "a\r\nb", "a\nid: 5"]),
        *(("id", bad) for bad in ["\r", "\n", "\x00", "a\r\nb", "a\nid: 5", "x\x00"]),
    ],
)
def test_encode_refuses_line_breaks_and_nul(field: str, bad: str) -> None:
    with pytest.raises(EncodeError):
        encode(Event("a", event=bad) if field == "event" else Event("a", id=bad))


def test_a_block_that_only_sets_an_id_is_its_id_line_and_a_blank_line() -> None:
    assert encode(Event("", id="9", dispatch=False)) == b"id: 9\n\n"
    assert encode(Event("ignored", "ignored", id="", dispatch=False)) == b"id\n\n"
    events, parser = parse(b"id: 9\n\n")
    assert events == [Event("", id="9", dispatch=False)]
    assert parser.last_event_id == "9"
    with pytest.raises(EncodeError):
        encode(Event("", dispatch=False))  # nothing to pass on
    with pytest.raises(EncodeError):
        encode(Event("", id="a\x00", dispatch=False))


def test_nul_in_an_event_type_is_valid_and_round_trips() -> None:
    event = Event("x", "a\x00b")
    assert parse(encode(event))[0] == [event]


def test_encode_refuses_empty_event_type_and_unencodable_text() -> None:
    with pytest.raises(EncodeError, match="empty"):
        encode(Event("a", event=""))
    with pytest.raises(EncodeError):
        encode(Event("\ud800"))
    # Both ValueError (for callers that treat it as bad input) and SSEError (the module's own).
    assert issubclass(EncodeError, ValueError)
    assert issubclass(EncodeError, SSEError)


@pytest.mark.parametrize("ms", [0, 1, 1500, 10**12])
def test_encode_retry_parses_back(ms: int) -> None:
    wire = encode_retry(ms)
    assert wire == f"retry: {ms}\n\n".encode()
    events, parser = parse(wire)
    assert events == []
    assert parser.retry_ms == ms


@pytest.mark.parametrize("ms", [-1, True, 1.5])
def test_encode_retry_refuses_non_natural(ms: int) -> None:
    with pytest.raises(EncodeError):
        encode_retry(ms)


@pytest.mark.parametrize(
    ("text", "wire"), [("", b":\n\n"), ("ping", b": ping\n\n"), (" x", b":  x\n\n")]
)
def test_encode_comment_parses_to_nothing(text: str, wire: bytes) -> None:
    assert encode_comment(text) == wire
    events, parser = parse(wire)
    assert events == []
    assert parser.last_event_id == ""
    assert parser.retry_ms is None


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "a\nb", "\ud800"])
def test_encode_comment_refuses_line_breaks_nul_and_unencodable(bad: str) -> None:
    with pytest.raises(EncodeError):
        encode_comment(bad)


def test_retry_and_comments_between_events_leave_events_intact() -> None:
    events = [Event("a", id="1"), Event("b\nc", "t"), Event("", id="")]

    def stream() -> Iterator[bytes]:
        yield encode_retry(100)
        for event in events:
            yield encode_comment("keep-alive")
            yield encode(event)
        yield encode_comment()

    parser = Parser()
    assert feed_all(parser, stream()) == events
    assert parser.retry_ms == 100
    assert parser.last_event_id == ""

"""What the gateway sends as an event id, it accepts back (issue 11, item 4).

Pure rule first (`gateway.core.ids` against the door's `client_last_event_id`), then
over real sockets: an upstream id the door would refuse reaches the client replaced,
and the client resumes with it, also from a draining gateway.
"""

from __future__ import annotations

import re
import sys

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.app import LIFECYCLE
from gateway.core import ids
from gateway.edge import policy
from gateway.errors import BadRequest
from gateway.sse import Event

from .conftest import GatewayFactory, route_doc
from .support import Upstream, connect, raw_request
from .test_layers import PACKAGE, imports_of

MAX = ids.DEFAULT_MAX_ID_BYTES
REPLACED = re.compile(r"~[A-Za-z0-9_-]{20}")

NASTY = {
    "1025 bytes": "7" * 1025,
    "5000 bytes": "7" * 5000,
    "1024 bytes of 2-byte characters plus one": "é" * 512 + "x",
    "SOH": "a\x01b",
    "NUL": "\x00",
    "DEL": "\x7f",
    "ESC": "x\x1b[31m",
    "vertical tab": "\x0b",
    "lone surrogate": "a\udcffb",
    "leading space": " 5",
    "trailing tab": "5\t",
}
INTACT = {
    "empty (a reset)": "",
    "counter": "42",
    "tab inside": "a\tb",
    "unicode": "événement-€-𝄞",
    "exactly 1024 bytes": "7" * 1024,
    "a gateway id's look": "~abc",
    "space inside": "a b",
}


def back_through_the_door(sent: str, max_bytes: int = MAX) -> str | None:
    """What the gateway makes of `sent` when a client resumes with it as Last-Event-ID."""
    return policy.client_last_event_id(sent, None, max_bytes)


@pytest.mark.parametrize("event_id", NASTY.values(), ids=NASTY.keys())
def test_an_id_the_door_would_not_take_back_is_replaced_by_a_gateway_id(event_id: str) -> None:
    sent = ids.wire_id(event_id, MAX)
    assert REPLACED.fullmatch(sent), sent
    assert back_through_the_door(sent) == sent
    assert ids.wire_id(event_id, MAX) == sent  # the live copy and a catch-up's copy agree


@pytest.mark.parametrize("event_id", INTACT.values(), ids=INTACT.keys())
def test_an_id_that_comes_back_intact_is_sent_unchanged(event_id: str) -> None:
    assert ids.acceptable(event_id, MAX) is None
    assert ids.wire_id(event_id, MAX) == event_id
    assert back_through_the_door(event_id) == (event_id or None)


def test_the_replacement_is_pinned_so_every_process_and_release_agrees() -> None:
    # Another replica (or the next release) must name the same event the same way.
    assert ids.wire_id("7" * 2000, MAX) == "~W62sGtYUBQ4XvqLleKTW"
    assert ids.wire_id("x\x01y", MAX) == "~ka5VhOmBEpzBVZaUbfQa"
    assert ids.wire_id("a\udcffb", MAX) != ids.wire_id("a\ufffdb", MAX)


@pytest.mark.parametrize(
    ("event_id", "reason"),
    [
        ("7" * 1025, "Last-Event-ID is longer than 1024 bytes"),
        ("a\x01", "Last-Event-ID holds a control character"),
        ("a\udcff", "Last-Event-ID is not valid UTF-8"),
    ],
)
def test_the_door_refuses_what_clients_send_with_the_shared_reason(
    event_id: str, reason: str
) -> None:
    with pytest.raises(BadRequest, match=f"^{re.escape(reason)}$"):
        back_through_the_door(event_id)


def test_a_limit_below_the_replacement_size_still_gets_an_id_it_accepts() -> None:
    assert back_through_the_door(ids.wire_id("7" * 50, 8), 8) == ids.replacement("7" * 50)[:8]


# Every code point, surrogates included (the parser never yields them, other sources might).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
LONG_TEXT = st.builds(lambda s, n: s * n, ANY_TEXT, st.integers(1, 80))


@settings(max_examples=500, deadline=None)
@given(event_id=st.one_of(ANY_TEXT, LONG_TEXT), max_bytes=st.integers(1, 2048))
def test_every_id_the_gateway_sends_comes_back_through_the_door_as_itself(
    event_id: str, max_bytes: int
) -> None:
    sent = ids.wire_id(event_id, max_bytes)
    assert back_through_the_door(sent, max_bytes) == (sent or None)
    # Header whitespace is stripped by browsers and aiohttp: it must not change the id.
    assert sent == sent.strip(" \t")
    if ids.returns_intact(event_id, max_bytes):
        assert sent == event_id
    else:
        assert sent == ids.replacement(event_id)[:max_bytes]


def test_the_rule_uses_only_the_standard_library() -> None:
    internal, external = imports_of(PACKAGE / "core" / "ids.py")
    assert not internal
    assert external <= set(sys.stdlib_module_names) | {"__future__"}, external


# --- over real sockets ------------------------------------------------------------------

LONG_ID = "7" * 2000
CONTROL_ID = "x\x01y"
UPSTREAM_EVENTS = [
    Event(data="one", id="1"),
    Event(data="long", id=LONG_ID),
    Event(data="control", id=CONTROL_ID),
    Event(data="four", id="4"),
]


async def test_a_client_resumes_with_the_replaced_id_it_was_sent(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.publish("t", *UPSTREAM_EVENTS)
    received = await client.wait_events(4)
    long_sent, control_sent = ids.wire_id(LONG_ID, MAX), ids.wire_id(CONTROL_ID, MAX)
    assert [e.id for e in received] == ["1", long_sent, control_sent, "4"]
    client.close()

    # EventSource comes back with the last id it saw: 200 and the ring's events after it.
    for last, after in ((long_sent, ["control", "four"]), (control_sent, ["four"])):
        again = await connect(session, gw.url("/events/t"), headers={"Last-Event-ID": last})
        replayed = await again.wait_events(len(after))
        assert [e.data for e in replayed] == after
        assert replayed[0].id == (control_sent if after[0] == "control" else "4")
        again.close()
    assert len(upstream.connections) == 1  # served from the ring, no catch-up upstream


async def test_a_draining_gateway_gives_a_replaced_id_its_drain_answer(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    gw.app[LIFECYCLE].ready = False
    for sent in (ids.wire_id(LONG_ID, MAX), ids.wire_id(CONTROL_ID, MAX)):
        async with session.get(gw.url("/events/t"), headers={"Last-Event-ID": sent}) as resp:
            assert resp.status == 200
            assert await resp.read() == b": ok\nretry: 3000\n"
    # The same door as a serving gateway: what it would refuse, draining refuses too.
    request = (
        b"GET /events/t HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + LONG_ID.encode() + b"\r\n\r\n"
    )
    head = await raw_request(gw.port, request)
    assert head.split(b" ")[1] == b"400"
    assert not upstream.connections

"""What reaches the browser, block by block (issue 12, items 3 and 4), in both modes:
id-only blocks, ids in data-less blocks, NUL in an event type, a large single-line event."""

from __future__ import annotations

import json

import aiohttp
import pytest

from gateway.sse import Event

from .conftest import GatewayFactory, route_doc
from .support import Upstream, connect

MODES = ["shared", "direct"]


@pytest.mark.parametrize("mode", MODES)
async def test_an_id_only_block_reaches_the_client_and_moves_its_last_event_id(
    mode: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, mode=mode))
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.send("t", b"data: a\n\nid: 9\n\nevent: x\nid: 10\n\ndata: b\n\nid\n\n")
    await client.wait_events(5)
    assert client.events == [
        Event("a"),
        Event("", id="9", dispatch=False),
        Event("", id="10", dispatch=False),  # an id in a block with a type but no data
        Event("b"),
        Event("", id="", dispatch=False),  # an empty id resets it, also without data
    ]
    assert b"data: a\n\nid: 9\n\nid: 10\n\ndata: b\n\nid\n\n" in client.raw
    assert client.parser.last_event_id == ""
    client.close()


async def test_an_id_only_block_is_in_the_ring_so_a_replay_carries_it(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    live = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.send("t", b"id: 1\ndata: a\n\nid: 2\n\nid: 3\ndata: c\n\n")
    await live.wait_events(3)
    back = await connect(session, gw.url("/events/t"), headers={"Last-Event-ID": "1"})
    await back.wait_events(2)
    assert back.events == [Event("", id="2", dispatch=False), Event("c", id="3")]
    back2 = await connect(session, gw.url("/events/t"), headers={"Last-Event-ID": "2"})
    await back2.wait_events(1)
    assert back2.events == [Event("c", id="3")]  # the id-only block's id resumes exactly
    assert len(upstream.connections) == 1
    for c in (live, back, back2):
        c.close()


@pytest.mark.parametrize("mode", MODES)
async def test_nul_in_an_event_type_is_passed_on_as_the_spec_allows(
    mode: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, mode=mode))
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await upstream.send("t", b"event: a\x00b\ndata: x\n\n")
    assert await client.wait_events(1) == [Event("x", "a\x00b")]
    client.close()


@pytest.mark.parametrize("mode", MODES)
async def test_a_200_kb_single_line_event_passes_at_the_default_limits(
    mode: str, upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, mode=mode))
    client = await connect(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    payload = json.dumps({"rows": ["x" * 100] * 2000})  # ~206 KB, one line
    assert len(payload) > 200_000
    await upstream.send("t", b"id: 1\ndata: " + payload.encode() + b"\n\n")
    assert await client.wait_events(1) == [Event(payload, id="1")]
    assert gw.metric("sse_gateway_events_dropped_total", route="r", reason="oversize") == 0
    client.close()

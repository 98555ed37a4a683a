"""No event lost or duplicated across reconnects, ring misses and gateway restarts."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from .conftest import GatewayFactory, route_doc
from .support import Pacer, Publisher, ResumingClient, Upstream, events


def ids(client: ResumingClient) -> list[str | None]:
    return [e.id for e in client.events]


async def connected_once(client: ResumingClient) -> None:
    await client.changes.until(lambda: client.connects == 1)


def expected(count: int) -> list[str | None]:
    return [str(i) for i in range(1, count + 1)]


async def test_reconnect_within_the_ring_gets_every_event_once(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream))
    steady = ResumingClient(session, gw.url("/events/t"))
    flaky = ResumingClient(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    await flaky.changes.until(lambda: flaky.connects == 1)
    publisher = Publisher(upstream, "t", 150).start()
    for cut in (20, 60, 100):  # drop the connection three times while events keep coming
        await flaky.wait_events(cut)
        flaky.drop()
    await flaky.wait_events(150)
    await steady.wait_events(150)
    assert ids(flaky) == expected(150)
    assert ids(steady) == expected(150)
    assert flaky.connects >= 4
    assert gw.metric("sse_gateway_replays_total", route="r", outcome="hit") >= 3
    assert len(upstream.connections) == 1  # all served from the ring
    await asyncio.gather(steady.stop(), flaky.stop(), publisher.task)


async def test_reconnect_older_than_the_ring_is_caught_up_from_the_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, ring_events=5))
    steady = ResumingClient(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    publisher = Publisher(upstream, "t", 120).start()
    await publisher.wait_sent(20)
    late = ResumingClient(session, gw.url("/events/t?lastEventId=3"))
    await late.wait_events(117)
    await steady.wait_events(120)
    assert ids(late) == expected(120)[3:]
    assert gw.metric("sse_gateway_catchup_requests_total", route="r") == 1
    catchups = [r for r in upstream.connections if r.headers.get("Last-Event-ID") == "3"]
    assert len(catchups) == 1
    await asyncio.gather(steady.stop(), late.stop(), publisher.task)


async def test_upstream_that_cannot_resume_yields_a_counted_gap_event(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, ring_events=5, upstream_resume=False))
    steady = ResumingClient(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    publisher = Publisher(upstream, "t", 40).start()
    await steady.wait_events(20)
    late = ResumingClient(session, gw.url("/events/t?lastEventId=2"))
    await late.changes.until(lambda: any(e.event == "gap" for e in late.events))
    gap = next(e for e in late.events if e.event == "gap")
    assert json.loads(gap.data) == {"lastEventId": "2", "reason": "not_in_ring"}
    await publisher.task
    await late.changes.until(lambda: late.events[-1].id == "40")
    assert gw.metric("sse_gateway_gaps_total", route="r", reason="not_in_ring") == 1
    assert len(upstream.connections) == 1  # no catch-up was attempted
    await asyncio.gather(steady.stop(), late.stop())


async def test_gateway_restart_with_100_subscribers_loses_and_repeats_nothing(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    route = route_doc(upstream)
    gw = await make_gateway(route)
    clients = [ResumingClient(session, gw.url("/events/t")) for _ in range(100)]
    await asyncio.gather(*(connected_once(c) for c in clients))
    publisher = Publisher(upstream, "t", 300, interval=0.003).start()
    await publisher.wait_sent(100)
    await gw.runner.cleanup()  # the gateway goes away mid-stream...
    assert len(upstream.connections) == 1
    await publisher.wait_sent(150)  # ...while the upstream keeps publishing
    gw2 = await make_gateway(route, port=gw.port)  # ...and comes back on the same port
    await publisher.task
    await asyncio.gather(*(c.wait_events(300, timeout=20) for c in clients))
    for client in clients:
        assert ids(client) == expected(300)
    # After the restart the upstream served the topic's own live stream plus one shared
    # catch-up per distinct Last-Event-ID the clients held (here they all held the same one),
    # never one per client: a catch-up that meets the ring bridges it back to that id.
    after_restart = upstream.connections[1:]
    live = [r for r in after_restart if "Last-Event-ID" not in r.headers]
    catchups = [r.headers["Last-Event-ID"] for r in after_restart if "Last-Event-ID" in r.headers]
    assert len(live) == 1
    assert len(catchups) == len(set(catchups))
    assert 1 <= len(catchups) <= 4
    assert gw2.metric("sse_gateway_topics", route="r") == 1
    await asyncio.gather(*(c.stop() for c in clients))


async def test_a_backend_that_ignores_last_event_id_is_a_gap_never_silent_loss(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    upstream.resumes = False
    upstream.history["t"] = events("t", 1, 8000)  # published before this gateway started
    gw = await make_gateway(route_doc(upstream))
    steady = ResumingClient(session, gw.url("/events/t"))
    await upstream.wait_open("t")
    pacer = Pacer(upstream, "t", first=8001, interval=0.01, limit=60)
    await steady.wait_events(5)
    # Back after a gateway restart, holding ids this process never carried: the backend
    # answers each with live events only. Never silent: a gap, then everything after it.
    # The first two could be ids an honest backend did not know (resume_unconfirmed); the
    # third marks the backend as one that ignores the header, remembered from then on.
    clients = []
    for held in ("8000", "7990", "7980", "7000"):
        client = ResumingClient(session, gw.url(f"/events/t?lastEventId={held}"))
        await client.changes.until(lambda c=client: bool(c.events))  # type: ignore[misc]
        clients.append(client)
    gaps = [json.loads(c.events[0].data) for c in clients]
    assert all(c.events[0].event == "gap" for c in clients)
    assert [g["lastEventId"] for g in gaps] == ["8000", "7990", "7980", "7000"]
    assert [g["reason"] for g in gaps] == [
        "resume_unconfirmed",
        "resume_unconfirmed",
        "upstream_ignored_resume",
        "upstream_ignored_resume",
    ]
    await pacer.task
    for client in clients:
        await client.changes.until(lambda c=client: c.events[-1].id == "8060")  # type: ignore[misc]
        after = [int(e.id) for e in client.events[1:] if e.id]
        assert after == list(range(after[0], 8061))  # after the gap: everything, once
    assert gw.metric("sse_gateway_gaps_total", route="r", reason="upstream_ignored_resume") == 2
    assert gw.metric("sse_gateway_catchup_requests_total", route="r") == 3  # then remembered
    await asyncio.gather(steady.stop(), *(c.stop() for c in clients))

"""No leak: connect/disconnect churn leaves file descriptors, tasks and topics where they began."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import aiohttp

from gateway.app import ADMISSION

from .conftest import GatewayFactory, route_doc
from .support import FakeClock, FakeTransport, Upstream, fake_downstream


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled(expected: int, read: Callable[[], int], timeout: float = 10) -> int:
    """Wait for a count the kernel or loop releases asynchronously (closed sockets)."""
    async with asyncio.timeout(timeout):
        # No event exists for "the kernel closed this fd": poll, bounded by the timeout.
        while (value := read()) > expected:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return value


async def test_5000_connect_disconnect_cycles_across_50_topics_leak_nothing(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, linger_seconds=0))
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up once so lazily created state (the client session's resolver, the
        # gateway's upstream session) is part of the baseline.
        async with session.get(gw.url("/events/warm")) as resp:
            await resp.content.readuntil(b"\n\n")
        await upstream.wait_closed("warm")
        fds, tasks = open_fds(), len(asyncio.all_tasks())

        async def cycle(i: int) -> None:
            async with session.get(gw.url(f"/events/t{i % 50}")) as resp:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # subscribed: the preamble arrived

        for start in range(0, 5000, 100):  # 100 at a time, bounded
            await asyncio.gather(*(cycle(i) for i in range(start, start + 100)))
        for t in range(50):
            await upstream.wait_closed(f"t{t}")
        assert gw.metric("sse_gateway_connections_opened_total", route="r") == 5001
        assert gw.metric("sse_gateway_subscribers", route="r") == 0
        assert gw.hub.topics == {}
        # Back to (or below: the baseline may still hold the warm-up's closing tasks) where
        # it started.
        assert await settled(fds, open_fds) <= fds
        assert await settled(tasks, lambda: len(asyncio.all_tasks())) <= tasks
    assert gw.app[ADMISSION].total == 0


async def test_subscriber_blocked_past_the_write_timeout_is_cut_off() -> None:
    clock = FakeClock()
    transport = FakeTransport()
    sub = fake_downstream(transport, clock, max_unsent_bytes=1_000_000)
    transport.backlog = 10  # the client stops reading: a small backlog that never drains
    assert sub.send(b"a")
    clock.advance(4)
    assert sub.send(b"b")
    transport.backlog = 0  # it drained: the clock starts over
    assert sub.send(b"c")
    transport.backlog = 10
    assert sub.send(b"d")
    clock.advance(4)
    assert sub.send(b"e")
    clock.advance(2)
    assert not sub.send(b"f")  # blocked for more than 5 s
    assert sub.outcome == "slow"
    assert transport.aborted
    assert transport.writes == [b"a", b"b", b"c", b"d", b"e"]


async def test_a_stream_closed_before_its_end_callback_is_set_still_ends() -> None:
    # subscribe() may cut a subscriber off (its replay found the socket backed up) before
    # serve() has set the end callback: the callback set afterwards must still run.
    transport = FakeTransport()
    sub = fake_downstream(transport, FakeClock(), max_unsent_bytes=10)
    transport.backlog = 100
    assert not sub.replay(b"x" * 50, 1)
    assert sub.outcome == "slow"
    ended = asyncio.Event()
    sub.on_end(ended.set)
    async with asyncio.timeout(5):
        await ended.wait()

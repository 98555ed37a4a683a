"""Resumes after a restart: catch-ups that splice onto each other, and a whole deploy.

After a gateway restart the ring is empty, so every client holding an older id
is caught up from the upstream, and the catch-ups' events are bridged into the
ring in front of one another. Each client must still get every event after its
own id exactly once, in order, with no gap event (issue 11: the third of three
clients resuming with X, X-2, X-1 never received X).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from gateway.sse import Event

from .conftest import GatewayFactory, route_doc
from .support import EventSource, Pacer, Upstream, events, free_port, gateway_process

# Events the upstream published before the (new) gateway opened the topic: its ring has
# none of them, as after a restart.
HISTORY = 30

# Resume orders, each id resuming only once the previous client has caught up. (25, 23, 24)
# is the X, X-2, X-1.
ORDERS = [
    (25, 23, 24),
    (25, 24, 23),
    (23, 25, 24),
    (24, 23, 25),
    (23, 24, 25),
    (24, 25, 23),
    (25, 22, 24, 23),
    (25, 23, 22, 24),
    (20, 25, 22, 24),
]


def numbered(first: int, last: int) -> list[Event]:
    return events("t", first, last - first + 1)


def newest(client: EventSource) -> int:
    return int(client.last_id or 0)


async def holds(client: EventSource, event_id: int, timeout: float = 10) -> None:
    await client.until(lambda c: newest(c) >= event_id, timeout)


def difference(got: list[Event], first: int, last: int) -> str:
    """What a client got wrong, for the failure message: missing, repeated, gaps."""
    ids = [e.id for e in got if e.id]
    wanted = [str(i) for i in range(first, last + 1)]
    missing = [i for i in wanted if i not in ids]
    repeated = sorted({i for i in ids if ids.count(i) > 1}, key=int)
    gaps = [e.data for e in got if e.event == "gap"]
    order = "" if ids == sorted(ids, key=int) else ", out of order"
    return f"missing {missing}, repeated {repeated}, gap events {gaps}{order}"


@pytest.mark.parametrize("opened_by", ["resuming", "live"])
@pytest.mark.parametrize("order", ORDERS, ids=lambda o: "-".join(map(str, o)))
async def test_three_catch_ups_in_any_order_splice_exactly(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    order: Sequence[int],
    opened_by: str,
) -> None:
    await upstream.publish("t", *numbered(1, HISTORY))  # nobody connected: history only
    gw = await make_gateway(route_doc(upstream))
    live = None
    if opened_by == "live":
        live = EventSource(session, gw.url("/events/t"))
        await upstream.wait_open("t")
        await live.until(lambda c: c.connects == 1)
    pacer = Pacer(upstream, "t", HISTORY + 1, interval=0.02, limit=500)
    resumed: list[tuple[int, EventSource]] = []
    try:
        for last_id in order:
            client = EventSource(session, gw.url("/events/t"), str(last_id))
            resumed.append((last_id, client))
            # Caught up: it holds an event published after it asked.
            target = pacer.sent + 1
            await pacer.wait_sent(target)
            await holds(client, target)
        final = await pacer.stop()
        for _, client in resumed:
            await client.until(lambda c: c.last_id == str(final))
        if live is not None:
            await live.until(lambda c: c.last_id == str(final))
        for last_id, client in resumed:
            assert client.events == numbered(last_id + 1, final), (
                f"Last-Event-ID {last_id} (order {order}): "
                + difference(client.events, last_id + 1, final)
            )
            assert client.connects == 1
        if live is not None:
            # It opened the topic live: everything from then on, and none of the catch-ups'.
            assert live.events == numbered(HISTORY + 1, final), difference(
                live.events, HISTORY + 1, final
            )
    finally:
        await pacer.stop()
        await asyncio.gather(*(c.stop() for _, c in resumed), *([live.stop()] if live else []))


CLIENTS = 100
# ~15 events/s: a drain of DRAIN_SECONDS then spreads the clients over ~30 different ids.
PUBLISH_INTERVAL = 0.066
DRAIN_SECONDS = 2
# Events published once the new process serves, before the final one everyone must reach.
AFTER_RESTART = 30
# Upstream requests the new process may make for the topic: its live stream plus a few shared
# catch-ups, however many different ids the clients hold (DESIGN.md, Continuity).
MAX_UPSTREAM_REQUESTS_AFTER_RESTART = 10


@pytest.mark.process
async def test_deploy_with_100_clients_holding_different_ids_loses_nothing(
    upstream: Upstream, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    # A short retry keeps the test short; clients come back spread over 100-300 ms.
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[[routes]]\nname = "r"\npath = "/events/{{topic}}"\nupstream = "{upstream.url()}"\n'
        "retry_ms = 100\nretry_max_ms = 300\n"
    )
    env = {
        "SSE_GATEWAY_SERVER_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "SSE_GATEWAY_SERVER_SHUTDOWN_TIMEOUT_SECONDS": "2",
        # Every client is 127.0.0.1: per-address and rate limits would refuse the test itself.
        "SSE_GATEWAY_LIMITS_MAX_SUBSCRIBERS_PER_CLIENT": "0",
        "SSE_GATEWAY_LIMITS_MAX_CONNECTIONS_PER_SECOND": "0",
        "SSE_GATEWAY_LIMITS_TOPIC_OPENS_PER_CLIENT_PER_SECOND": "0",
        "SSE_GATEWAY_LIMITS_MAX_TOPIC_SHARE_PER_CLIENT": "1.0",
    }
    args = ["--config", str(config)]
    url = f"http://127.0.0.1:{port}/events/t"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients: list[EventSource] = []
        pacer: Pacer | None = None
        try:
            async with gateway_process(args, env) as (proc, _):
                clients = [EventSource(session, url, retry_ms=100) for _ in range(CLIENTS)]
                await asyncio.gather(*(c.until(lambda c: c.connects == 1) for c in clients))
                await upstream.wait_open("t")
                pacer = Pacer(upstream, "t", 1, PUBLISH_INTERVAL, limit=1000)
                await pacer.wait_sent(10)
                await asyncio.gather(*(c.until(lambda c: newest(c) >= 10) for c in clients))
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), DRAIN_SECONDS + 2 + 5) == 0
            held = {c.last_id for c in clients}
            before = len(upstream.connections)
            async with gateway_process(args, env) as (proc, _):
                restarted_at = pacer.sent
                await pacer.wait_sent(restarted_at + AFTER_RESTART, timeout=15)
                final = await pacer.stop()
                await asyncio.gather(
                    *(c.until(lambda c: c.last_id == str(final), timeout=15) for c in clients)
                )
                after_restart = upstream.connections[before:]
                await asyncio.gather(*(c.stop() for c in clients))
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), DRAIN_SECONDS + 2 + 5)
        finally:
            if pacer is not None:
                await pacer.stop()
            await asyncio.gather(*(c.stop() for c in clients))
    # The drain spread the clients over many ids: the scenario the issue reports.
    assert len(held) >= 5, held
    silent: list[str] = []
    reported: list[str] = []
    for i, client in enumerate(clients):
        if client.events != numbered(1, final):
            resumed_with = sorted(set(client.sent_ids) - {""}, key=int)
            line = f"client {i} (resumed with {resumed_with}): " + difference(
                client.events, 1, final
            )
            (reported if any(e.event == "gap" for e in client.events) else silent).append(line)
    assert silent + reported == [], (
        f"{len(silent)} of {CLIENTS} clients lost or repeated events silently, "
        f"{len(reported)} behind a gap event:\n" + "\n".join((silent + reported)[:8])
    )
    assert all(c.statuses == [] for c in clients), {s for c in clients for s in c.statuses}
    catchups = sorted({r.headers.get("Last-Event-ID", "<live>") for r in after_restart})
    assert len(after_restart) <= MAX_UPSTREAM_REQUESTS_AFTER_RESTART, (
        f"{len(after_restart)} upstream requests after the restart for {len(held)} held ids: "
        f"{catchups}"
    )

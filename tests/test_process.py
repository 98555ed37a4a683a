"""The real process: `python -m gateway` started, streamed through, signalled."""

from __future__ import annotations

import asyncio
import signal
import socket

import aiohttp
import pytest

from .support import Upstream, connect, events, gateway_process

pytestmark = pytest.mark.process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_quick_start_flags_proxy_a_route_and_sigterm_drains_cleanly(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    args = [
        "--listen",
        f"127.0.0.1:{port}",
        "--path",
        "/events/{topic}",
        "--upstream",
        upstream.url(),
        "--heartbeat",
        "0.5",
        "--cors-origin",
        "https://app.example",
    ]
    async with gateway_process(args) as (proc, log):
        client = await connect(
            session, f"http://127.0.0.1:{port}/events/p", headers={"Origin": "https://app.example"}
        )
        assert client.response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        await upstream.wait_open("p")
        await upstream.publish("p", *events("p", 1, 3))
        assert await client.wait_events(3) == events("p", 1, 3)
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200

        proc.send_signal(signal.SIGTERM)
        await client.wait_end(timeout=10)
        assert client.response.content.at_eof()  # terminated chunked body: a clean end
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await upstream.wait_closed("p")
        await log.until("stopped")
        assert any("SIGTERM: shutting down" in line for line in log.lines)


async def test_default_configuration_serves_the_demo(session: aiohttp.ClientSession) -> None:
    # The embedded configuration binds fixed ports 8080/8081; move them with the
    # environment so a developer's running `make run` does not clash with the test.
    port, demo_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        "SSE_GATEWAY_SERVER_LISTEN": f"127.0.0.1:{port}",
        "SSE_GATEWAY_DEMO_LISTEN": f"127.0.0.1:{demo_port}",
        "SSE_GATEWAY_DEMO_INTERVAL_SECONDS": "0.05",
        "SSE_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    async with gateway_process([], env) as (proc, _):
        async with session.get(f"http://127.0.0.1:{port}/") as resp:
            page = await resp.text()
        assert "EventSource" in page
        # The demo topics are upstream routes like any other: the route's pattern applies.
        async with session.get(f"http://127.0.0.1:{port}/events/NOT-A-TOPIC") as resp:
            assert resp.status == 400
        client = await connect(session, f"http://127.0.0.1:{port}/events/counter")
        received = await client.wait_events(2, timeout=10)
        assert int(received[1].data) == int(received[0].data) + 1
        client.close()
        # Metrics on their own listener, not next to the public streams.
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'sse_gateway_connections_opened_total{route="demo"}' in text
        assert "process_open_fds" in text
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 404
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0

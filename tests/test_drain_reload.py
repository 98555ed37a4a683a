"""SIGTERM drains in waves; SIGHUP reloads. The real process, signalled."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from .support import Upstream, connect, events, free_port, gateway_process

pytestmark = pytest.mark.process


async def test_sigterm_flips_readiness_then_drains_500_streams_over_the_window(
    upstream: Upstream,
) -> None:
    port = free_port()
    env = {
        "SSE_GATEWAY_SERVER_DRAIN_SECONDS": "2",
        "SSE_GATEWAY_SERVER_SHUTDOWN_TIMEOUT_SECONDS": "5",
        "SSE_GATEWAY_LIMITS_MAX_SUBSCRIBERS_PER_CLIENT": "0",
        "SSE_GATEWAY_LIMITS_MAX_CONNECTIONS_PER_SECOND": "0",
    }
    args = ["--listen", f"127.0.0.1:{port}", "--path", "/e/{topic}", "--upstream", upstream.url()]
    ended: list[float] = []
    tails: list[bytes] = []

    async def follow(
        session: aiohttp.ClientSession, opened: asyncio.Event, counter: list[int]
    ) -> None:
        async with session.get(f"http://127.0.0.1:{port}/e/t") as resp:
            counter[0] += 1
            if counter[0] == 500:
                opened.set()
            body = b""
            async for chunk in resp.content.iter_any():
                body += chunk
            ended.append(time.monotonic())
            tails.append(body[-40:])

    async with (
        gateway_process(args, env) as (proc, log),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        opened, counter = asyncio.Event(), [0]
        followers = [asyncio.create_task(follow(session, opened, counter)) for _ in range(500)]
        await asyncio.wait_for(opened.wait(), 30)
        await upstream.wait_open("t")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):  # ask until the flip is seen (each ask is a request)
            while True:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 503:
                        not_ready_at = time.monotonic()
                        break
        await asyncio.wait_for(asyncio.gather(*followers), 20)
        assert await asyncio.wait_for(proc.wait(), 2 + 5 + 5) == 0
        exited = time.monotonic()
    assert len(ended) == 500
    # Readiness flips before the first wave (the process logs it first), and a load balancer
    # probing during the drain sees 503 while streams are still open.
    assert any("draining: /readyz answers 503; ending 500 streams" in x for x in log.lines)
    assert not_ready_at < max(ended)
    spread = max(ended) - min(ended)
    assert spread > 1.0, spread  # over the 2 s window, not all in the same 100 ms
    # Each stream ends with the goodbye: a retry line, in a block left open (stream.py).
    assert all(tail.endswith(b"\n") and b"retry: " in tail for tail in tails)
    assert exited - signalled < 2 + 5 + 5


async def test_sighup_keeps_unchanged_routes_and_survives_a_broken_file(
    upstream: Upstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"

    def write(b_heartbeat: float) -> None:
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[[routes]]\nname = "a"\npath = "/a/{{topic}}"\nupstream = "{upstream.url()}"\n'
            f'[[routes]]\nname = "b"\npath = "/b/{{topic}}"\nupstream = "{upstream.url()}"\n'
            f"heartbeat_seconds = {b_heartbeat}\n"
        )

    write(15)
    async with gateway_process(["--config", str(config)]) as (proc, log):
        a = await connect(session, f"http://127.0.0.1:{port}/a/x")
        b = await connect(session, f"http://127.0.0.1:{port}/b/y")
        await upstream.wait_open("x")
        await upstream.wait_open("y")

        write(7)  # route b changes, route a does not
        proc.send_signal(signal.SIGHUP)
        await log.until("reloaded: 2 routes, 1 unchanged; 1 topics of changed routes closed")
        await b.wait_end()
        assert bytes(b.raw).endswith(b"\n")
        assert b"retry: " in bytes(b.raw)[-30:]
        await upstream.publish("x", *events("x", 1, 1))
        assert await a.wait_events(1) == events("x", 1, 1)
        assert not a.ended

        config.write_text("[[routes]\nbroken")
        proc.send_signal(signal.SIGHUP)
        await log.until("new configuration rejected")
        await upstream.publish("x", *events("x", 2, 1))
        assert await a.wait_events(2) == events("x", 1, 2)
        again = await connect(session, f"http://127.0.0.1:{port}/b/y")  # old config serves
        again.close()
        a.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0

"""The real process: `python -m gateway` started, streamed through, signalled."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp
import pytest

from .support import Upstream, connect, events

pytestmark = pytest.mark.process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def gateway_process(
    args: Sequence[str], extra_env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["SSE_GATEWAY_SERVER_DRAIN_SECONDS"] = "0.2"  # tests that time the drain set their own
    env.update(extra_env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        # Ready when the log says it listens: wait on the process's own report.
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            while b"listening on" not in (line := await proc.stdout.readline()):
                assert line, "gateway exited before listening"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


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
    async with gateway_process(args) as proc:
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
        assert proc.stdout is not None
        log = (await proc.stdout.read()).decode()
        assert "SIGTERM: shutting down" in log
        assert "stopped" in log


async def test_default_configuration_serves_the_demo(session: aiohttp.ClientSession) -> None:
    # The embedded configuration binds fixed ports 8080/8081; move them with the
    # environment so a developer's running `make run` does not clash with the test.
    port, demo_port = free_port(), free_port()
    env = {
        "SSE_GATEWAY_SERVER_LISTEN": f"127.0.0.1:{port}",
        "SSE_GATEWAY_DEMO_LISTEN": f"127.0.0.1:{demo_port}",
        "SSE_GATEWAY_DEMO_INTERVAL_SECONDS": "0.05",
    }
    async with gateway_process([], env) as proc:
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
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0

"""Worker processes: a shared port, summed metrics, a dead worker replaced, all drained."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aiohttp
import pytest

from .support import Upstream, connect, events, free_port, gateway_process

pytestmark = pytest.mark.process


async def test_two_workers_share_the_port_sum_metrics_survive_a_crash_and_drain(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    port, metrics_port = free_port(), free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--path", "/e/{topic}", "--upstream", upstream.url()]
    env = {
        "SSE_GATEWAY_SERVER_WORKERS": "2",
        "SSE_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "SSE_GATEWAY_LIMITS_MAX_SUBSCRIBERS_PER_CLIENT": "0",
    }
    async with gateway_process(args, env) as (proc, log):
        await log.changes.until(lambda: sum("listening on" in x for x in log.lines) == 2, 15)
        pids = {int(m) for x in log.lines for m in re.findall(r"worker \d started, pid (\d+)", x)}
        assert len(pids) == 2

        clients = [await connect(session, f"http://127.0.0.1:{port}/e/t") for _ in range(8)]
        # Each worker that got a client has the topic open (the gauge sums the workers) and
        # its own upstream request: publish only once every one of them is connected.
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            text = await resp.text()
        topics = re.search(r'^sse_gateway_topics\{route="default"\} (\d+)', text, re.MULTILINE)
        assert topics is not None
        await upstream.wait_open("t", count=int(topics.group(1)))
        await upstream.publish("t", *events("t", 1, 2))
        for client in clients:
            assert await client.wait_events(2) == events("t", 1, 2)
        # One upstream connection per worker that holds subscribers of the topic, never more.
        assert 1 <= len(upstream.connections) <= 2
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            text = await resp.text()
        assert 'sse_gateway_connections_opened_total{route="default"} 8.0' in text.splitlines()
        assert 'sse_gateway_subscribers{route="default"} 8.0' in text.splitlines()
        for client in clients:
            client.close()

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)  # a worker dies: the supervisor starts another
        await log.until(f"(pid {victim}) exited with status -9; restarting")
        await log.changes.until(lambda: sum("listening on" in x for x in log.lines) == 3, 15)
        again = await connect(session, f"http://127.0.0.1:{port}/e/t")
        again.close()

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await log.until("all workers stopped")
        assert sum(x.rsplit(": ", 1)[-1] == "stopped" for x in log.lines) >= 2


def test_workers_setting() -> None:
    from gateway.config import ConfigError, load, parse_args

    args = parse_args(["--path", "/e/{t}", "--upstream", "http://h/{t}"])
    assert load(args, {"SSE_GATEWAY_SERVER_WORKERS": "3"}).server.workers == 3
    assert load(args, {"SSE_GATEWAY_SERVER_WORKERS": '"auto"'}).server.workers == (
        os.cpu_count() or 1
    )
    with pytest.raises(ConfigError) as info:
        load(args, {"SSE_GATEWAY_SERVER_WORKERS": "0"})
    assert info.value.problems[0].startswith("server.workers: expected a number from 1 to 256")

"""The real process: `python -m gateway` started, streamed through, signalled."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .support import Upstream, connect, events, free_port, gateway_exit, gateway_process

pytestmark = pytest.mark.process


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


# A log record below WARNING, as __main__ formats them: anything else on stderr is a problem.
QUIET_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO) ")


def failure_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if not QUIET_LOG_LINE.match(line)]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port some other process listens on (no SO_REUSEPORT: nobody can share it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def quick_start(port: int, upstream: Upstream) -> list[str]:
    return ["--listen", f"127.0.0.1:{port}", "--path", "/e/{topic}", "--upstream", upstream.url()]


async def test_a_port_in_use_is_one_line_and_exit_2(upstream: Upstream) -> None:
    with taken_port() as port:
        code, lines = await gateway_exit(quick_start(port, upstream))
    assert code == 2
    assert failure_lines(lines) == [
        f"sse-gateway: cannot listen on 127.0.0.1:{port} (public): address already in use"
    ], lines


async def test_an_explicit_metrics_listener_in_use_is_one_line_and_exit_2(
    upstream: Upstream,
) -> None:
    with taken_port() as metrics_port:
        args = [
            *quick_start(free_port(), upstream),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        ]
        code, lines = await gateway_exit(args)
    assert code == 2
    assert failure_lines(lines) == [
        f"sse-gateway: cannot listen on 127.0.0.1:{metrics_port} (metrics): address already in use"
    ], lines


async def test_an_unusable_address_is_one_line_and_exit_2(upstream: Upstream) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host.
    args = ["--listen", "192.0.2.1:8080", "--path", "/e/{topic}", "--upstream", upstream.url()]
    code, lines = await gateway_exit(args)
    assert code == 2
    assert failure_lines(lines) == [
        "sse-gateway: cannot listen on 192.0.2.1:8080 (public): cannot assign requested address"
    ], lines


@pytest.mark.parametrize("broken", ["missing key", "garbage certificate"])
async def test_an_unusable_tls_file_is_one_line_and_exit_2(
    upstream: Upstream, tmp_path: Path, broken: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    if broken == "garbage certificate":
        key.write_text("not a key\n")
    env = {
        "SSE_GATEWAY_SERVER_TLS_CERT_FILE": str(cert),
        "SSE_GATEWAY_SERVER_TLS_KEY_FILE": str(key),
    }
    code, lines = await gateway_exit(quick_start(free_port(), upstream), env)
    assert code == 2
    (line,) = failure_lines(lines)
    expected = (
        f"server.tls_key_file: cannot read '{key}'"
        if broken == "missing key"
        else f"invalid TLS configuration: cannot load certificate '{cert}' with key '{key}'"
    )
    assert line.startswith("sse-gateway: "), lines
    assert expected in line, lines


async def test_workers_that_cannot_bind_stop_the_supervisor_with_exit_2(upstream: Upstream) -> None:
    with taken_port() as port:
        code, lines = await gateway_exit(
            quick_start(port, upstream), {"SSE_GATEWAY_SERVER_WORKERS": "2"}, timeout=30
        )
    assert code == 2
    failure = f"sse-gateway: cannot listen on 127.0.0.1:{port} (public): address already in use"
    assert failure in lines, lines
    assert not any("restarting in" in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


async def test_two_gateways_with_default_metrics_both_serve_streams_and_metrics(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    # No metrics setting: both want 127.0.0.1:9464; the second (at least) falls back.
    default_metrics = {"SSE_GATEWAY_METRICS_LISTEN": None}
    async with contextlib.AsyncExitStack() as stack:
        gateways = []
        for _ in range(2):
            port = free_port()
            proc, log = await stack.enter_async_context(
                gateway_process(quick_start(port, upstream), default_metrics)
            )
            gateways.append((port, proc, log))
        clients = [
            await connect(session, f"http://127.0.0.1:{port}/e/t") for port, _, _ in gateways
        ]
        await upstream.wait_open("t", 2)
        await upstream.publish("t", *events("t", 1, 2))
        for client in clients:
            assert await client.wait_events(2) == events("t", 1, 2)
        for _, _, log in gateways:
            (url,) = (m for line in log.lines for m in re.findall(r"metrics on (http://\S+)", line))
            async with session.get(url) as resp:
                assert resp.status == 200
                text = await resp.text()
            assert 'sse_gateway_connections_opened_total{route="default"} 1.0' in text.splitlines()
        assert any("9464 is in use" in line for _, _, log in gateways for line in log.lines)
        for client in clients:
            client.close()
        for _, proc, _ in gateways:
            proc.send_signal(signal.SIGTERM)
        for _, proc, _ in gateways:
            assert await asyncio.wait_for(proc.wait(), 15) == 0

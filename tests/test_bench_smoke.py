"""Guard against the benchmark rotting: ~3 s side-by-side runs against the gateway only, with
the Python load client and with the C one (bench/sseload.c, built with gcc), and the C client's
parser against a server that frames its streams awkwardly.

Not timing tests: they check that `python -m bench.compare` still starts the upstream and the
gateway, connects every subscriber, sees the events arrive, and reports them as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cload

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.process


def _need_gcc() -> None:
    """The C client needs Debian's gcc: skipped without it, except under CI=true (CI machines
    have gcc, so a missing one there is a broken machine, not a reason to skip)."""
    if cload.compiler() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("gcc is missing on a CI machine (apt-get install gcc)")
        pytest.skip("gcc is not installed: the C load client cannot be built")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", ["python", "c"])
def test_compare_runs_against_the_gateway(tmp_path: Path, client: str) -> None:
    if client == "c":
        _need_gcc()
    out = tmp_path / "compare.jsonl"
    argv = [sys.executable, "-m", "bench.compare", "--scenario", "fanout", "--targets", "gateway"]
    argv += ["--subscribers", "20", "--duration", "3", "--log-dir", str(tmp_path / "logs")]
    argv += ["--json", str(out), "--client", client]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "subscribers connected" in done.stdout, report
    assert f"load client {client}" in done.stdout, report
    lines = out.read_text().splitlines()
    assert len(lines) == 1, report
    result = json.loads(lines[0])
    assert result["target"] == "gateway"
    assert result["client"] == client
    assert result.get("error") is None, report
    assert result["connected"] == 20, report
    assert result["no_first_event"] == 0, report
    assert result["delivery_ratio"] > 0.9, report
    assert result["lost_events"] == 0, report
    assert result["duplicate_events"] == 0, report
    assert result["upstream_connections"] == 1, report
    assert result["latency_samples"] > 0, report
    assert result["client_cpu_seconds"] >= 0, report
    if client == "c":  # the Python runner's own CPU, apart from the C client's
        assert "runner_cpu_seconds" in result, report


# --- the C client's parsing, against a server that frames its streams awkwardly ----------------

EVENTS_PER_STREAM = 30  # each response ends (last chunk, or close) after this many events
LAST_SEQ = 90  # after this one a stream stays open and quiet


def _event(seq: int, crlf: bool) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    data = b'{"t":%.6f,"seq":%d,"pad":"xx"}' % (time.time(), seq)
    return b": comment" + nl + b"id: %d" % seq + nl + b"data: " + data + nl + nl


async def _awkward_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """/t0: chunked, cut into random pieces (chunk-size lines split, several chunks per write,
    events across chunks, CRLF and LF); /t1: HTTP/1.0, no framing, ends at close; /t2: a 404;
    /t3: a header block over 64 KiB. A stream resumes after its Last-Event-ID."""
    rng = random.Random(5)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split()[1]
        ids = [h.split(":", 1)[1] for h in lines if h.lower().startswith("last-event-id:")]
        first = int(ids[0]) + 1 if ids else 1
        if path == "/t2":
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        if path == "/t3":
            writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
            await writer.drain()
            return
        chunked = path == "/t0"
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        ends = first + EVENTS_PER_STREAM <= LAST_SEQ  # else: the last one, open and quiet
        body = b"retry: 1000\n\n" + b"".join(
            _event(seq, crlf=seq % 3 == 0)
            for seq in range(first, min(first + EVENTS_PER_STREAM, LAST_SEQ + 1))
        )
        wire = bytearray()
        pos = 0
        while pos < len(body):
            size = rng.randint(1, 300)
            piece = body[pos : pos + size]
            pos += size
            wire += b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece
        if chunked and ends:
            wire += b"0\r\n\r\n"
        pos = 0
        while pos < len(wire):
            size = rng.choice((1, 2, 3, 7, 50, 400))
            if ends and not chunked and pos + size >= len(wire):
                # The last bytes and the FIN in one segment: a read returns the bytes and stops
                # short at the FIN, and no other wakeup follows (an edge-triggered reader must
                # still see the end).
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                writer.write(bytes(wire[pos:]))
                writer.write_eof()
                break
            writer.write(bytes(wire[pos : pos + size]))
            pos += size
            await writer.drain()
            await asyncio.sleep(0.0005)
        if not ends:
            await reader.read()  # the last stream stays open and quiet until the client leaves
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.mark.timeout(60)
async def test_c_client_parses_awkward_framing(tmp_path: Path) -> None:
    _need_gcc()
    binary = cload.build()
    server = await asyncio.start_server(_awkward_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    argv = cload.argv_for(binary, port=port, path="/t", n=8, topics=4, sample_every=1)
    client = await cload.CLoad.start([*argv, "--max-seconds", "50"], tmp_path / "sseload.log")
    try:
        connected, failed = await client.connect(10)
        assert connected == 4  # /t0 and /t1, twice each
        assert failed == {"bad_status": 2, "header_too_long": 2}
        await client.record(True)
        first = await client.snapshot()
        deadline = time.monotonic() + 20
        snap = first
        while snap.events < 4 * LAST_SEQ and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            snap = await client.snapshot()
        assert snap.events == 4 * LAST_SEQ, snap
        assert (snap.lost, snap.gaps, snap.dups, snap.errors) == (0, 0, 0, 0), snap
        # Every stream was ended twice by the server and reopened after its Last-Event-ID.
        assert snap.ends == snap.reopens == 4 * (LAST_SEQ // EVENTS_PER_STREAM - 1), snap
        assert snap.broken == {"last_chunk": 4, "closed": 4}, snap
        assert snap.open == 4
        samples = first.samples + snap.samples
        assert samples, snap
        assert all(-0.01 < s < 5 for s in samples), samples[:10]
        window = cload.window(first, snap)
        assert window.events == snap.events - first.events
        assert snap.cpu_seconds > 0
    finally:
        how = await client.close()
        server.close()
        await server.wait_closed()
    assert how.startswith("exited (0)"), how


# --- the deploy fault scenario -----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_deploy_scenario_runs_and_counts(tmp_path: Path) -> None:
    """`python -m bench.deploy` restarts a real gateway under 10 clients and reports every
    client back and caught up (short drain and retry so it takes seconds, not the bench's 20)."""
    out = tmp_path / "deploy.jsonl"
    argv = [sys.executable, "-m", "bench.deploy", "--clients", "10", "--flow-seconds", "1"]
    argv += ["--drain-seconds", "0.5", "--retry-ms", "500", "--json", str(out)]
    argv += ["--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=80, check=False)
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "restart -> all clients streaming" in done.stdout, report
    lines = out.read_text().splitlines()
    assert len(lines) == 1, report
    r = json.loads(lines[0])
    assert r["clients"] == 10
    assert r["streaming_before_sigterm"] == 10, report
    assert r["old_gateway_exit"] == 0, report
    assert r["clients_caught_up"] == 10, report
    assert r["clients_gave_up"] == 0, report
    assert r["restart_to_all_streaming_seconds"] is not None, report
    assert r["events_received"] > 10, report
    assert r["events_lost"] == r["events_lost_announced"] + r["events_lost_silent"], report
    assert r["clients_reconnecting_without_id"] == 0, report  # every client had an id
    assert r["upstream_requests_after_restart"]["live"] == 1, report
    assert r["gateway_log_problems"] == 0, report
    # An upstream that resumes: nothing lost, repeated or even announced across the deploy.
    assert r["events_lost"] == 0, report
    assert r["duplicates"] == 0, report
    assert r["gap_events"] == 0, report

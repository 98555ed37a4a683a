"""Bad-token flood: does a valid client still get its stream? (issue 10)

Usage: python -m bench.flood [--seconds 10] [--rate 4000] [--client c|python] [--workers N]
                             [--close rst|wait] [--log-dir DIR]

Starts `bench.upstream` and `python -m gateway --config FILE` as child processes on free
loopback ports. The config has one JWT route (HS256, a secret), `[limits]` at their defaults
(not lifted: max_connections_per_second = 2000, of which one address may use half) and the
metrics on the main port. Then, for --seconds:

* the flood: --workers processes, all from source address 127.0.0.1, open a connection per
  request on a fixed open-loop schedule (request k of a worker is due at start + k / its rate,
  whatever became of the earlier ones), send `GET /events/news` with a well-formed JWT signed
  with the WRONG secret and `Connection: close`, read the status line, and close. At most
  --max-in-flight requests per worker are outstanding; a due request over that cap is counted
  as skipped, not sent. Two implementations (--client):
  - `c` (the default when gcc is installed): bench/floodload.c, built into bench/.build/ on
    first use (bench.cload.build), one epoll thread per process (--workers, default 1). With
    --close rst (the default) it closes right after the status line with an RST (SO_LINGER 0):
    no TIME_WAIT on either side, so ~40,000 connections in 10 s from one address do not run
    out of ephemeral ports; --close wait reads on until the gateway closes, as the Python one.
  - `python`: uvloop processes (--workers, default 2) that read on until the gateway closes
    (so the TIME_WAIT stays on its side), then close. They cannot reach 4,000/s on 2 cores.
* the valid client: in this process, from source address 127.0.0.2, one try every --interval
  seconds (~20 in 10 s), each a new connection with a valid token for `news`: its status, the
  time from the try's start to the end of the response headers, and whether an event (a
  `data:` line, not the preamble) arrived within --first-event-timeout seconds of the start.

Prints the achieved flood rate (requests sent and answered per second), the flood's statuses
(401 / 429 / other / errors), its latency, how late the load processes ran behind their
schedule, every valid try, the gateway's CPU and its rejection counters from /metrics.

Every child is stopped by its PID (SIGTERM, then SIGKILL after a grace period), whatever
happens; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import uvloop

from bench.client import percentile, raise_fd_limit
from bench.cload import build, compiler
from bench.fanout import (
    HOST,
    READY_TIMEOUT,
    Child,
    commit,
    cpu_seconds,
    fmt,
    free_port,
    log_problems,
    machine_cpu,
    parse_prometheus,
    start_child,
)

FLOOD_ADDR = "127.0.0.1"
VALID_ADDR = "127.0.0.2"
METRICS_ADDR = "127.0.0.3"
SECRET = "bench-flood-secret-that-is-long-enough-for-hs256"
WRONG_SECRET = "not-the-gateway-secret-but-just-as-long-for-hs256"
TOPIC = "news"
REQUEST_TIMEOUT = 5.0  # a flood request: connect + status line + the gateway's close
TICK = 0.001  # the flood schedule's granularity
START_DELAY = 1.0  # the workers fork, then everyone starts at the same wall-clock time
READ_SIZE = 4096
FLOODLOAD_SOURCE = Path(__file__).resolve().with_name("floodload.c")
# Linux: bind the source address only, let connect() pick the port per destination.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def config_text(gw_port: int, up_port: int) -> str:
    """The gateway's configuration: one JWT route; [limits] left at their defaults."""
    return f"""\
[server]
listen = "{HOST}:{gw_port}"

[metrics]
listen = ""

[[routes]]
name = "flood"
path = "/events/{{topic}}"
upstream = "http://{HOST}:{up_port}/stream/{{topic}}"

[routes.auth]
type = "jwt"
algorithms = ["HS256"]
key = "{SECRET}"
"""


def make_token(secret: str) -> str:
    return jwt.encode(
        {"sub": "bench", "exp": int(time.time()) + 3600, "topics": [TOPIC]},
        secret,
        algorithm="HS256",
    )


def request_bytes(port: int, token: str) -> bytes:
    return (
        f"GET /events/{TOPIC} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def new_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    return sock


def status_of(head: bytes) -> int:
    """The status code of an `HTTP/1.x NNN reason` line (0 if unreadable)."""
    parts = head.split(b" ", 2)
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return 0


# --- the flood (one worker process) ----------------------------------------------------------


@dataclass
class FloodStats:
    due: int = 0  # requests the schedule called for
    sent: int = 0  # connections started
    skipped: int = 0  # due, but --max-in-flight were outstanding
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # start -> status line, s
    late: list[float] = field(default_factory=list)  # how far behind schedule a batch started
    first_sent: float = 0.0
    last_sent: float = 0.0
    last_done: float = 0.0
    cpu_seconds: float = 0.0


class FloodConnection(asyncio.Protocol):
    """One flood request: send it on connect, read the status line, wait for the close."""

    __slots__ = ("buffer", "done", "payload", "started", "stats", "status")

    def __init__(self, payload: bytes, stats: FloodStats, done: asyncio.Future[None]) -> None:
        self.payload = payload
        self.stats = stats
        self.done = done
        self.buffer = b""
        self.status = 0
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.payload)  # type: ignore[attr-defined]  # a uvloop TCPTransport

    def data_received(self, data: bytes) -> None:
        if self.status:
            return
        self.buffer += data
        if b"\r\n" in self.buffer or len(self.buffer) >= READ_SIZE:
            self.status = status_of(self.buffer) or -1
            self.stats.statuses[self.status] += 1
            self.stats.latencies.append(time.monotonic() - self.started)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status:
            reason = type(exc).__name__ if exc else "closed"
            self.stats.errors[f"{reason} (before a status line)"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def flood_one(
    loop: asyncio.AbstractEventLoop, port: int, payload: bytes, stats: FloodStats
) -> None:
    done: asyncio.Future[None] = loop.create_future()
    conn = FloodConnection(payload, stats, done)
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            transport, _ = await loop.create_connection(
                lambda: conn, HOST, port, local_addr=(FLOOD_ADDR, 0)
            )
            await done
    except TimeoutError:
        if not conn.status:  # answered but not yet closed by the gateway: not an error
            conn.status = -2  # counted here, not again by connection_lost
            stage = "connect" if transport is None else "status line"
            stats.errors[f"timeout ({stage})"] += 1
    except OSError as exc:
        stats.errors[f"{type(exc).__name__} (connect)"] += 1
    finally:
        if transport is not None:
            transport.close()
        stats.last_done = time.monotonic()


async def flood(
    port: int, rate: float, start_at: float, seconds: float, max_in_flight: int
) -> FloodStats:
    loop = asyncio.get_running_loop()
    payload = request_bytes(port, make_token(WRONG_SECRET))
    stats = FloodStats()
    total = int(rate * seconds)
    in_flight: set[asyncio.Task[None]] = set()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    stats.first_sent = t0
    k = 0
    while k < total and time.monotonic() - t0 < seconds + 1.0:
        now = time.monotonic()
        due = min(total, int((now - t0) * rate) + 1)
        if due > k:
            stats.late.append(max(0.0, now - (t0 + k / rate)))
        while k < due:
            k += 1
            stats.due += 1
            if len(in_flight) >= max_in_flight:
                stats.skipped += 1
                continue
            stats.sent += 1
            task = asyncio.create_task(flood_one(loop, port, payload, stats))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        stats.last_sent = time.monotonic()
        await asyncio.sleep(max(0.0, min(TICK, t0 + k / rate - time.monotonic())))
    stats.due += total - k  # not reached within the time bound
    if in_flight:
        await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT + 1.0)
    for task in in_flight:
        task.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.cpu_seconds = usage.ru_utime + usage.ru_stime
    return stats


def flood_worker(
    out: mp.Queue[Any], port: int, rate: float, start_at: float, seconds: float, cap: int
) -> None:
    try:
        stats = uvloop.run(flood(port, rate, start_at, seconds, cap))
        out.put(("ok", stats))
    except BaseException as exc:
        out.put(("error", repr(exc)))


# --- the flood, native (bench/floodload.c) ----------------------------------------------------


@dataclass
class CFlood:
    """One running floodload process; its JSON result goes to `out`, its stderr to `err`."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_c_flood(
    binary: Path,
    index: int,
    port: int,
    rate: float,
    start_at: float,
    args: argparse.Namespace,
    log_dir: Path,
) -> CFlood:
    argv = [str(binary), "--host", HOST, "--source", FLOOD_ADDR, "--port", str(port)]
    argv += ["--rate", repr(rate), "--seconds", repr(args.seconds)]
    argv += ["--max-count", str(max(1, int(rate * args.seconds)))]
    argv += ["--max-in-flight", str(args.max_in_flight), "--timeout", repr(REQUEST_TIMEOUT)]
    argv += ["--start-at", repr(start_at), "--close", args.close, "--request-file", "-"]
    argv += ["--samples"]
    out, err = log_dir / f"floodload-{index}.json", log_dir / f"floodload-{index}.log"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=o, stderr=e)
    assert proc.stdin is not None
    try:
        proc.stdin.write(request_bytes(port, make_token(WRONG_SECRET)))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it exited at once; its stderr says why, and finish_c_flood reports it
    return CFlood(proc, out, err)


def finish_c_flood(flood: CFlood, within: float) -> FloodStats:
    """Wait (at most `within` s) for a floodload process and read its result line."""
    try:
        code = flood.proc.wait(max(0.1, within))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"floodload (pid {flood.pid}) did not finish in time") from None
    try:
        d: dict[str, Any] = json.loads(flood.out.read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        tail = flood.err.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"floodload (pid {flood.pid}) exited {code}: {tail}") from None
    return c_stats(d)


def c_stats(d: dict[str, Any]) -> FloodStats:
    """FloodStats from a floodload result line (run with --samples)."""
    stats = FloodStats(due=int(d["due"]), sent=int(d["sent"]), skipped=int(d["skipped"]))
    stats.statuses.update({int(k): int(v) for k, v in d["statuses"].items()})
    for name, n in d["connect_errors"].items():
        stats.errors[f"{name} (connect)"] += int(n)
    for name, n in d["errors"].items():
        if n:
            stats.errors[f"{name.split()[0]} (before a status line)"] += int(n)
    for stage, n in (
        ("connect", d["timeouts"]["connect"]),
        ("status line", d["timeouts"]["status"]),
    ):
        if n:
            stats.errors[f"timeout ({stage})"] += int(n)
    stats.latencies = [ms / 1000 for ms in d["latency_samples_ms"]]
    stats.late = [ms / 1000 for ms in d["lag_samples_ms"]]
    stats.first_sent = float(d["first_sent"])
    stats.last_sent = float(d["last_sent"])
    stats.cpu_seconds = float(d["cpu_user"]) + float(d["cpu_sys"])
    return stats


# --- the valid client (this process) ----------------------------------------------------------


@dataclass
class Try:
    at: float  # seconds since the flood started
    status: int = 0
    headers_s: float = float("nan")
    first_event_s: float = float("nan")
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.first_event_s == self.first_event_s


async def valid_try(port: int, payload: bytes, at: float, first_event_timeout: float) -> Try:
    loop = asyncio.get_running_loop()
    result = Try(at)
    started = time.monotonic()
    sock = new_socket(VALID_ADDR)
    stage = "connect"
    try:
        async with asyncio.timeout(first_event_timeout):
            await loop.sock_connect(sock, (HOST, port))
            stage = "send"
            await loop.sock_sendall(sock, payload)
            stage = "headers"
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await loop.sock_recv(sock, READ_SIZE)
                if not chunk:
                    result.error = "closed before the headers"
                    return result
                data += chunk
            result.headers_s = time.monotonic() - started
            result.status = status_of(data)
            if result.status != 200:
                return result
            stage = "first event"
            body = data.split(b"\r\n\r\n", 1)[1]
            while b"\ndata:" not in body and not body.startswith(b"data:"):
                chunk = await loop.sock_recv(sock, READ_SIZE)
                if not chunk:
                    result.error = "stream ended before an event"
                    return result
                body += chunk
            result.first_event_s = time.monotonic() - started
    except TimeoutError:
        result.error = f"timeout ({stage})"
    except OSError as exc:
        result.error = f"{type(exc).__name__} ({stage})"
    finally:
        sock.close()
    return result


async def valid_client(
    port: int, start_at: float, seconds: float, interval: float, first_event_timeout: float
) -> list[Try]:
    payload = request_bytes(port, make_token(SECRET))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    tasks = []
    for i in range(int(seconds / interval)):
        await asyncio.sleep(max(0.0, t0 + i * interval - time.monotonic()))
        at = time.monotonic() - t0
        tasks.append(asyncio.create_task(valid_try(port, payload, at, first_event_timeout)))
    return list(await asyncio.gather(*tasks))


async def scrape_metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics, fetched from a third address (not the flood's, not the client's)."""
    loop = asyncio.get_running_loop()
    sock = new_socket(METRICS_ADDR)
    try:
        async with asyncio.timeout(5.0):
            await loop.sock_connect(sock, (HOST, port))
            await loop.sock_sendall(
                sock, f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            for _ in range(10_000):
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    break
                data += chunk
    except (TimeoutError, OSError):
        return {}
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = dechunk(body)
    return parse_prometheus(body.decode(errors="replace"))


def dechunk(body: bytes) -> bytes:
    out = b""
    for _ in range(100_000):
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in metrics.items():
        if key.startswith(name + "{") and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


async def flood_window_cpu(pid: int, start_at: float, seconds: float) -> tuple[float, float, float]:
    """The gateway's CPU seconds over the flood's window, and the machine's busy and total."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    before, (busy0, total0) = cpu_seconds(pid), machine_cpu()
    await asyncio.sleep(seconds)
    busy1, total1 = machine_cpu()
    return cpu_seconds(pid) - before, busy1 - busy0, total1 - total0


async def run_client_side(
    args: argparse.Namespace, port: int, start_at: float, gateway_pid: int
) -> tuple[list[Try], dict[str, float], dict[str, float], tuple[float, float, float]]:
    before = await scrape_metrics(port)
    cpu = asyncio.create_task(flood_window_cpu(gateway_pid, start_at, args.seconds))
    tries = await valid_client(
        port, start_at, args.seconds, args.interval, args.first_event_timeout
    )
    cpu_figures = await cpu
    after = await scrape_metrics(port)
    return tries, before, after, cpu_figures


# --- report ------------------------------------------------------------------------------------


def merge(parts: list[FloodStats]) -> FloodStats:
    total = FloodStats()
    for p in parts:
        total.due += p.due
        total.sent += p.sent
        total.skipped += p.skipped
        total.statuses.update(p.statuses)
        total.errors.update(p.errors)
        total.latencies += p.latencies
        total.late += p.late
        total.cpu_seconds += p.cpu_seconds
    total.first_sent = min(p.first_sent for p in parts)
    total.last_sent = max(p.last_sent for p in parts)
    total.last_done = max(p.last_done for p in parts)
    return total


def ms(value: float) -> str:
    return fmt(round(value * 1000, 1))


def report(
    args: argparse.Namespace,
    flood_stats: FloodStats,
    tries: list[Try],
    cpu_figures: tuple[float, float, float],
    before: dict[str, float],
    after: dict[str, float],
    problems: list[str],
) -> str:
    f = flood_stats
    gateway_cpu, busy, capacity = cpu_figures
    send_window = max(1e-9, f.last_sent - f.first_sent)
    answered = sum(f.statuses.values())
    lat = sorted(f.latencies)
    late = sorted(f.late)
    other = {str(k): v for k, v in sorted(f.statuses.items()) if k not in (401, 429)}

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    rows = [
        ("commit", commit()),
        (
            "flood target",
            f"{fmt(args.rate)} req/s for {fmt(args.seconds)} s,"
            f" {args.workers} {args.client} procs"
            + (f", close {args.close}" if args.client == "c" else ""),
        ),
        ("flood due / sent / skipped", f"{fmt(f.due)} / {fmt(f.sent)} / {fmt(f.skipped)}"),
        ("achieved rate sent (req/s)", fmt(round(f.sent / send_window))),
        ("achieved rate answered (req/s)", fmt(round(answered / send_window))),
        ("send window (s)", fmt(round(send_window, 3))),
        (
            "schedule lag ms p50/p99/max",
            f"{ms(percentile(late, 50))} / {ms(percentile(late, 99))}"
            f" / {ms(late[-1] if late else float('nan'))}",
        ),
        ("flood 401", fmt(f.statuses.get(401, 0))),
        ("flood 429", fmt(f.statuses.get(429, 0))),
        ("flood other statuses", fmt(other)),
        ("flood errors", fmt(dict(f.errors))),
        (
            "flood status ms p50/p99/max",
            f"{ms(percentile(lat, 50))} / {ms(percentile(lat, 99))}"
            f" / {ms(lat[-1] if lat else float('nan'))}",
        ),
        (
            "gw rejected (metrics delta)",
            fmt(
                {
                    reason: delta("sse_gateway_requests_rejected_total", reason=reason)
                    for reason in ("auth", "rate_limit", "client_limit", "malformed")
                }
            ),
        ),
        (
            "gateway CPU s (% of 1 core)",
            f"{fmt(round(gateway_cpu, 2))} ({fmt(round(100 * gateway_cpu / args.seconds))}%)",
        ),
        ("load procs CPU s", fmt(round(f.cpu_seconds, 2))),
        ("machine CPU s busy / capacity", f"{fmt(round(busy, 1))} / {fmt(round(capacity, 1))}"),
        ("gateway log problems", fmt(len(problems))),
    ]
    ok = [t for t in tries if t.ok]
    heads = sorted(t.headers_s for t in tries if t.headers_s == t.headers_s)
    firsts = sorted(t.first_event_s for t in ok)
    rows += [
        ("valid tries / streams", f"{len(tries)} / {len(ok)}"),
        ("valid statuses", fmt(dict(Counter(str(t.status or t.error) for t in tries)))),
        (
            "valid headers ms p50/max",
            f"{ms(percentile(heads, 50))} / {ms(heads[-1] if heads else float('nan'))}",
        ),
        (
            "valid first event ms p50/max",
            f"{ms(percentile(firsts, 50))} / {ms(firsts[-1] if firsts else float('nan'))}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("valid tries (at s: status, headers ms, first event ms, error)")
    for t in tries:
        lines.append(
            f"  {t.at:6.2f}: {t.status or '-'}, {ms(t.headers_s)}, {ms(t.first_event_s)}"
            + (f", {t.error}" if t.error else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="flood duration")
    parser.add_argument("--rate", type=float, default=4000.0, help="bad-token requests/s")
    parser.add_argument(
        "--client",
        choices=("c", "python"),
        default="c" if compiler() else "python",
        help="flood implementation: bench/floodload.c (default with gcc) or uvloop processes",
    )
    parser.add_argument("--workers", type=int, help="flood processes (default: c 1, python 2)")
    parser.add_argument(
        "--close",
        choices=("rst", "wait"),
        default="rst",
        help="c client: reset right after the status line, or wait for the gateway's close",
    )
    parser.add_argument("--max-in-flight", type=int, default=4000, help="per flood process")
    parser.add_argument("--interval", type=float, default=0.5, help="valid tries every N s")
    parser.add_argument("--first-event-timeout", type=float, default=5.0)
    parser.add_argument("--event-rate", type=float, default=10.0, help="upstream events/s")
    parser.add_argument("--log-dir", type=Path, help="child logs (default: a new temp dir)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.workers is None:
        args.workers = 1 if args.client == "c" else 2
    if not (0 < args.seconds <= 600 and args.rate > 0 and 1 <= args.workers <= 16):
        parser.error("need 0 < --seconds <= 600, --rate > 0, 1 <= --workers <= 16")
    if not (0 < args.interval <= args.seconds and args.event_rate > 0):
        parser.error("need 0 < --interval <= --seconds and --event-rate > 0")

    raise_fd_limit()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sse-flood-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    up_port, gw_port = free_port(), free_port()
    config = log_dir / "gateway.toml"
    config.write_text(config_text(gw_port, up_port))
    py = sys.executable
    binary = build(FLOODLOAD_SOURCE) if args.client == "c" else None
    children: list[Child] = []
    workers: list[mp.process.BaseProcess] = []
    c_floods: list[CFlood] = []
    ctx = mp.get_context("fork")
    queue: mp.Queue[Any] = ctx.Queue()
    parts: list[FloodStats] = []
    failures: list[str] = []
    try:
        upstream = start_child(
            "upstream",
            [py, "-m", "bench.upstream", "--port", str(up_port), "--rate", str(args.event_rate)],
            log_dir,
        )
        children.append(upstream)
        upstream.wait_ready("listening on", READY_TIMEOUT)
        gateway = start_child("gateway", [py, "-m", "gateway", "--config", str(config)], log_dir)
        children.append(gateway)
        gateway.wait_ready("listening on", READY_TIMEOUT)
        print(
            f"upstream pid {upstream.pid} :{up_port}, gateway pid {gateway.pid} :{gw_port},"
            f" logs in {log_dir}",
            file=sys.stderr,
        )
        start_at = time.time() + START_DELAY
        if binary is not None:
            c_floods += [
                start_c_flood(binary, i, gw_port, args.rate / args.workers, start_at, args, log_dir)
                for i in range(args.workers)
            ]
        for _ in range(args.workers if binary is None else 0):
            w: mp.process.BaseProcess = ctx.Process(
                target=flood_worker,
                args=(
                    queue,
                    gw_port,
                    args.rate / args.workers,
                    start_at,
                    args.seconds,
                    args.max_in_flight,
                ),
                daemon=True,
            )
            w.start()
            workers.append(w)
        budget = START_DELAY + args.seconds + args.first_event_timeout + 20.0
        tries, before, after, cpu_figures = uvloop.run(
            asyncio.wait_for(run_client_side(args, gw_port, start_at, gateway.pid), budget)
        )
        deadline = time.monotonic() + REQUEST_TIMEOUT + 15.0
        for c_flood in c_floods:
            try:
                parts.append(finish_c_flood(c_flood, deadline - time.monotonic()))
            except RuntimeError as exc:
                failures.append(str(exc))
        for _ in workers:
            try:
                kind, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # queue.Empty
                failures.append("a flood process sent no result in time")
                break
            if kind == "ok":
                parts.append(value)
            else:
                failures.append(value)
    finally:
        for c_flood in c_floods:
            if c_flood.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c_flood.pid, 9)
                c_flood.proc.wait(5.0)
        for w in workers:
            w.join(5.0)
            if w.is_alive() and w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, 9)
                w.join(5.0)
        for child in reversed(children):
            how = child.stop()
            print(f"{child.name} (pid {child.pid}) {how}", file=sys.stderr)
    if not parts:
        print(f"no flood results: {failures}", file=sys.stderr)
        return 1
    problems = log_problems(gateway.log_text())
    print()
    print(report(args, merge(parts), tries, cpu_figures, before, after, problems))
    for failure in failures:
        print(f"flood process failure: {failure}")
    if problems:
        print(f"\ngateway log ({gateway.log}), first problems:")
        for line in problems[:10]:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

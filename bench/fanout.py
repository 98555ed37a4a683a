"""Fan-out benchmark: one upstream topic (or a few), many subscribers through the gateway.

Usage: python -m bench.fanout --subscribers 1000 --rate 10 --size 200 --duration 20
                              [--topics 1] [--http10] [--sample-every K] [--json FILE]

Starts `bench.upstream` and `python -m gateway` as child processes on free loopback ports (their
stderr goes to files in --log-dir, printed at the end), measures the gateway's idle RSS, opens
the subscribers with `bench.client` in this process (200 connecting at once), waits until every
one has received an event, then measures over --duration seconds:

* deliveries/s summed over the subscribers, against subscribers x rate x duration (and against
  what the upstream actually produced in the window, from its /stats);
* lost (sequence gaps) and duplicated events, subscribers that got nothing, streams that ended;
* latency p50/p99/max from upstream write to client read (1 event in K sampled; K defaults to
  give at most ~2,000 samples/s);
* gateway CPU (utime+stime from /proc/PID/stat, plus its children's) per million deliveries,
  gateway RSS before and with subscribers -> KiB per subscriber, its /metrics (upstream
  connections, events delivered, closed streams by outcome);
* this process's own CPU per million events received (the load client shares the 2 cores).

Both children are stopped (SIGTERM to their PID, then SIGKILL after a grace period) whatever
happens; the whole run is bounded by the duration plus fixed timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.client import (
    Load,
    Window,
    connect_all,
    percentile,
    raise_fd_limit,
    wait_first_events,
)

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
STOP_GRACE = 10.0
CONNECT_TIMEOUT = 10.0  # per subscriber: TCP connect + response headers
PARALLEL_CONNECTS = 200
MAX_SAMPLES_PER_SECOND = 2000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGESIZE") // 1024


# --- /proc ------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int | str, children: bool = True) -> float:
    """utime+stime of `pid`, plus its reaped children (cutime+cstime) and live children."""
    f = _stat_fields(pid)
    # After comm: f[0] is field 3 (state); utime/stime/cutime/cstime are fields 14..17.
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
        ticks += sum(int(c[11]) + int(c[12]) for c in _live_children(pid))
    return ticks / CLK_TCK


def _live_children(pid: int | str) -> list[list[str]]:
    if pid == "self":
        pid = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = _stat_fields(entry.name)
        except (OSError, ValueError):
            continue
        if f[1] == str(pid):
            found.append(f)
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = f[3] + f[4]  # idle + iowait
    total = sum(f)
    return (total - idle) / CLK_TCK, total / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- child processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) before ready:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM this child by PID, wait, SIGKILL if needed; return how it ended."""
        if self.proc.poll() is not None:
            return f"had exited ({self.proc.returncode})"
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_GRACE)
            return f"exited {code} after SIGTERM"
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(STOP_GRACE)
            return "killed (SIGKILL) after SIGTERM grace"


# Every load-client connection comes from 127.0.0.1, so the gateway's per-address and
# rate limits would refuse most of them: the benchmark measures fan-out, not admission.
GATEWAY_ENV = {
    "SSE_GATEWAY_LIMITS_MAX_SUBSCRIBERS_PER_CLIENT": "0",
    "SSE_GATEWAY_LIMITS_MAX_CONNECTIONS_PER_SECOND": "0",
    "SSE_GATEWAY_LIMITS_MAX_SUBSCRIBERS": "0",
    "SSE_GATEWAY_METRICS_LISTEN": "",  # the runner reads /metrics on the gateway's port
}


def upstream_argv(args: argparse.Namespace, port: int) -> list[str]:
    """The SSE generator's command line, for the rate and size under test."""
    return [
        sys.executable,
        "-m",
        "bench.upstream",
        "--port",
        str(port),
        "--rate",
        str(args.rate),
        "--size",
        str(args.size),
    ]


def start_child(
    name: str, argv: list[str], log_dir: Path, extra_env: dict[str, str] | None = None
) -> Child:
    log = log_dir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra_env or {})
    with log.open("wb") as f:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
    return Child(name, proc, log)


# --- metrics ----------------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line (labels kept verbatim)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return await resp.json()


async def get_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return parse_prometheus(await resp.text())


def by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """Non-zero samples of `name` on the default route, keyed by the value of `label`."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(name + "{") and 'route="default"' in key and value:
            found = re.search(label + r'="([^"]*)"', key)
            if found:
                out[found.group(1)] = value
    return out


def m(metrics: dict[str, float], name: str, **labels: str) -> float:
    labels = {"route": "default", **labels}
    # prometheus_client writes labels sorted by name.
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return metrics.get(f"{name}{{{inner}}}", float("nan"))


# --- the run ---------------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, gateway: Child, upstream: Child, gw_port: int, up_port: int
) -> dict[str, Any]:
    r: dict[str, Any] = {}
    expected_rate = args.subscribers * args.rate
    k = args.sample_every or max(1, math.ceil(expected_rate / MAX_SAMPLES_PER_SECOND))
    load = Load(sample_every=k, countdown=k)
    paths = [f"/events/t{i % args.topics}" for i in range(args.subscribers)]
    metrics_url = f"http://{HOST}:{gw_port}/metrics"
    stats_url = f"http://{HOST}:{up_port}/stats"
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(0.5)
        r["gateway_rss_idle_kib"] = rss_kib(gateway.pid)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(60 + args.subscribers / 50):
                await connect_all(
                    load,
                    HOST,
                    gw_port,
                    paths,
                    http10=args.http10,
                    parallel=PARALLEL_CONNECTS,
                    connect_timeout=CONNECT_TIMEOUT,
                )
        except TimeoutError:
            load.failures["connect phase timed out"] += 1
        r["connect_seconds"] = round(time.monotonic() - t0, 2)
        r["connected"] = len(load.conns)
        r["connect_failures"] = dict(load.failures)
        if not load.conns:
            raise RuntimeError(f"no subscriber could connect: {r['connect_failures']}")
        t0 = time.monotonic()
        r["no_first_event"] = await wait_first_events(load, 10 + 3 / args.rate)
        r["first_event_seconds"] = round(time.monotonic() - t0, 2)
        print(
            f"connected {r['connected']}/{args.subscribers} in {r['connect_seconds']}s"
            f" (failures {r['connect_failures'] or 0}); all streaming after"
            f" {r['first_event_seconds']}s more ({r['no_first_event']} without an event)",
            file=sys.stderr,
        )
        # Let the connect burst settle (buffers, the first batches) before the window opens.
        await asyncio.sleep(1.0)

        metrics_a = await get_metrics(session, metrics_url)
        r["gateway_rss_start_kib"] = rss_kib(gateway.pid)
        gw_cpu_a = cpu_seconds(gateway.pid)
        up_cpu_a = cpu_seconds(upstream.pid)
        me_cpu_a = cpu_seconds("self", children=False)
        box_a = machine_cpu()
        stats_a = await get_json(session, stats_url)
        load.recording = True
        snap_a = load.snapshot()
        await asyncio.sleep(args.duration)
        snap_b = load.snapshot()
        load.recording = False
        stats_b = await get_json(session, stats_url)
        box_b = machine_cpu()
        me_cpu_b = cpu_seconds("self", children=False)
        gw_cpu_b = cpu_seconds(gateway.pid)
        up_cpu_b = cpu_seconds(upstream.pid)
        r["gateway_rss_end_kib"] = rss_kib(gateway.pid)
        metrics_b = await get_metrics(session, metrics_url)
        load.close_all()

    w = Window.between(snap_a, snap_b)
    r["window_seconds"] = round(w.seconds, 3)
    r["deliveries"] = w.events
    r["deliveries_per_second"] = round(w.events / w.seconds, 1)
    r["expected_deliveries"] = round(args.subscribers * args.rate * args.duration)
    r["delivery_ratio"] = round(w.events / r["expected_deliveries"], 4)
    upstream_events = {
        t: stats_b.get(t, {}).get("seq", 0) - stats_a.get(t, {}).get("seq", 0) for t in stats_b
    }
    per_topic = {f"t{i}": paths.count(f"/events/t{i}") for i in range(args.topics)}
    r["upstream_events_in_window"] = sum(upstream_events.values())
    possible = sum(n * upstream_events.get(t, 0) for t, n in per_topic.items())
    r["delivery_ratio_vs_upstream"] = round(w.events / possible, 4) if possible else None
    r["lost_events"] = w.lost
    r["gaps"] = w.gaps
    r["duplicate_events"] = w.dups
    r["silent_subscribers"] = w.silent
    r["streams_ended_in_window"] = w.closed
    r["stream_errors_in_window"] = w.errors
    lat = sorted(load.samples)
    r["latency_samples"] = len(lat)
    r["sample_every"] = k
    r["latency_ms_p50"] = round(percentile(lat, 50) * 1e3, 3)
    r["latency_ms_p99"] = round(percentile(lat, 99) * 1e3, 3)
    r["latency_ms_max"] = round(lat[-1] * 1e3, 3) if lat else None
    gw_cpu = gw_cpu_b - gw_cpu_a
    me_cpu = me_cpu_b - me_cpu_a
    per_m = w.events / 1e6
    r["gateway_cpu_seconds"] = round(gw_cpu, 2)
    r["gateway_cpu_percent"] = round(100 * gw_cpu / w.seconds, 1)
    r["gateway_cpu_s_per_million"] = round(gw_cpu / per_m, 3) if w.events else None
    r["upstream_cpu_seconds"] = round(up_cpu_b - up_cpu_a, 2)
    r["client_cpu_seconds"] = round(me_cpu, 2)
    r["client_cpu_percent"] = round(100 * me_cpu / w.seconds, 1)
    r["client_cpu_s_per_million"] = round(me_cpu / per_m, 3) if w.events else None
    busy = box_b[0] - box_a[0]
    r["machine_cpu_busy_seconds"] = round(busy, 2)
    r["machine_cpu_capacity_seconds"] = round(box_b[1] - box_a[1], 2)
    # Everything else: softirq/kernel work for loopback traffic and other people's processes.
    r["other_cpu_seconds"] = round(busy - gw_cpu - me_cpu - r["upstream_cpu_seconds"], 2)
    grown = r["gateway_rss_end_kib"] - r["gateway_rss_idle_kib"]
    r["gateway_kib_per_subscriber"] = round(grown / len(load.conns), 2) if load.conns else None
    r["gw_subscribers"] = m(metrics_b, "sse_gateway_subscribers")
    r["gw_upstream_connections"] = m(metrics_b, "sse_gateway_upstream_connections")
    r["gw_topics"] = m(metrics_b, "sse_gateway_topics")
    r["gw_events_received_in_window"] = m(metrics_b, "sse_gateway_events_received_total") - m(
        metrics_a, "sse_gateway_events_received_total"
    )
    r["gw_events_delivered_in_window"] = m(metrics_b, "sse_gateway_events_delivered_total") - m(
        metrics_a, "sse_gateway_events_delivered_total"
    )
    r["gw_upstream_connects_total"] = m(metrics_b, "sse_gateway_upstream_connects_total")
    r["gw_connections_closed_total"] = by_label(
        metrics_b, "sse_gateway_connections_closed_total", "outcome"
    )
    r["gw_upstream_failures_total"] = by_label(
        metrics_b, "sse_gateway_upstream_failures_total", "reason"
    )
    r["gw_events_dropped_total"] = by_label(metrics_b, "sse_gateway_events_dropped_total", "reason")
    return r


def no_nan(value: Any) -> Any:
    """NaN (a metric the gateway did not export) becomes null: JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


def log_problems(text: str) -> list[str]:
    keys = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception")
    return [line for line in text.splitlines() if any(k in line for k in keys)]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items()) or "none"
    return "n/a" if value is None else str(value)


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    rows = [
        (
            "subscribers connected",
            f"{fmt(r['connected'])} / {fmt(args.subscribers)}"
            f" ({fmt(r['no_first_event'])} without a first event)",
        ),
        ("connect failures", fmt(r["connect_failures"])),
        ("connect time (s)", fmt(r["connect_seconds"])),
        ("topics / rate / size", f"{args.topics} / {fmt(args.rate)} ev/s / {args.size} B"),
        ("window (s)", fmt(r["window_seconds"])),
        ("deliveries", fmt(r["deliveries"])),
        ("deliveries/s", fmt(r["deliveries_per_second"])),
        ("expected (subs x rate x dur)", fmt(r["expected_deliveries"])),
        ("delivery ratio", fmt(r["delivery_ratio"])),
        ("  vs upstream's actual output", fmt(r["delivery_ratio_vs_upstream"])),
        ("upstream events in window", fmt(r["upstream_events_in_window"])),
        ("lost events (gaps)", f"{fmt(r['lost_events'])} ({fmt(r['gaps'])})"),
        ("duplicate events", fmt(r["duplicate_events"])),
        ("silent subscribers", fmt(r["silent_subscribers"])),
        ("streams ended in window", fmt(r["streams_ended_in_window"])),
        (
            "latency ms p50 / p99 / max",
            f"{fmt(r['latency_ms_p50'])} / {fmt(r['latency_ms_p99'])} / {fmt(r['latency_ms_max'])}",
        ),
        ("latency samples (1 in K)", f"{fmt(r['latency_samples'])} (K={r['sample_every']})"),
        (
            "gateway CPU s (% of 1 core)",
            f"{fmt(r['gateway_cpu_seconds'])} ({fmt(r['gateway_cpu_percent'])}%)",
        ),
        ("gateway CPU s / M deliveries", fmt(r["gateway_cpu_s_per_million"])),
        (
            "gateway RSS KiB idle/start/end",
            f"{fmt(r['gateway_rss_idle_kib'])} / {fmt(r['gateway_rss_start_kib'])}"
            f" / {fmt(r['gateway_rss_end_kib'])}",
        ),
        ("gateway KiB per subscriber", fmt(r["gateway_kib_per_subscriber"])),
        ("gw upstream connections", fmt(r["gw_upstream_connections"])),
        ("gw subscribers (metrics)", fmt(r["gw_subscribers"])),
        ("gw delivered in window (metrics)", fmt(r["gw_events_delivered_in_window"])),
        ("gw streams closed (metrics)", fmt(r["gw_connections_closed_total"])),
        (
            "gw upstream failures / drops",
            f"{fmt(r['gw_upstream_failures_total'])} / {fmt(r['gw_events_dropped_total'])}",
        ),
        ("gateway log problems", fmt(r["gateway_log_problems"])),
        ("upstream CPU s", fmt(r["upstream_cpu_seconds"])),
        (
            "client CPU s (% of 1 core)",
            f"{fmt(r['client_cpu_seconds'])} ({fmt(r['client_cpu_percent'])}%)",
        ),
        ("client CPU s / M events", fmt(r["client_cpu_s_per_million"])),
        (
            "machine CPU s busy / capacity",
            f"{fmt(r['machine_cpu_busy_seconds'])} / {fmt(r['machine_cpu_capacity_seconds'])}",
        ),
        ("  of which other (kernel, others)", fmt(r["other_cpu_seconds"])),
        ("load average before", r["loadavg_before"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per topic")
    parser.add_argument("--size", type=int, default=200, help="event data bytes")
    parser.add_argument("--duration", type=float, default=20.0, help="measurement window, s")
    parser.add_argument("--topics", type=int, default=1, help="subscribers spread round-robin")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="gateway --heartbeat")
    parser.add_argument(
        "--sample-every", type=int, default=0, metavar="K", help="latency: 1 event in K (0: auto)"
    )
    parser.add_argument("--http10", action="store_true", help="subscribers speak HTTP/1.0")
    parser.add_argument("--log-dir", type=Path, help="child logs (default: a new temp dir)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="append the figures as JSON")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.subscribers < 1 or args.rate <= 0 or args.duration <= 0 or args.topics < 1:
        parser.error("--subscribers, --rate, --duration and --topics must be positive")

    raise_fd_limit()
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sse-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    up_port, gw_port = free_port(), free_port()
    py = sys.executable
    children: list[Child] = []
    result: dict[str, Any] = {}
    try:
        upstream = start_child("upstream", upstream_argv(args, up_port), log_dir)
        children.append(upstream)
        upstream.wait_ready("listening on", READY_TIMEOUT)
        gateway = start_child(
            "gateway",
            [
                py,
                "-m",
                "gateway",
                "--listen",
                f"{HOST}:{gw_port}",
                "--path",
                "/events/{topic}",
                "--upstream",
                f"http://{HOST}:{up_port}/stream/{{topic}}",
                "--heartbeat",
                str(args.heartbeat),
            ],
            log_dir,
            GATEWAY_ENV,
        )
        children.append(gateway)
        gateway.wait_ready("listening on", READY_TIMEOUT)
        print(
            f"upstream pid {upstream.pid} :{up_port}, gateway pid {gateway.pid} :{gw_port},"
            f" logs in {log_dir}",
            file=sys.stderr,
        )
        budget = args.duration + 120 + args.subscribers / 50 + 3 / args.rate
        result = uvloop.run(
            asyncio.wait_for(measure(args, gateway, upstream, gw_port, up_port), budget)
        )
    finally:
        for child in reversed(children):
            how = child.stop()
            print(f"{child.name} (pid {child.pid}) {how}", file=sys.stderr)
    problems = log_problems(gateway.log_text())
    result["gateway_log_problems"] = len(problems)
    result["upstream_log_problems"] = len(log_problems(upstream.log_text()))
    result["log_dir"] = str(log_dir)
    result["loadavg_before"] = loadavg
    print()
    print(table(args, result))
    if problems:
        print(f"\ngateway log ({gateway.log}), first problems:")
        for line in problems[:10]:
            print("  " + line)
    if args.json:
        record: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "command": shlex.join(["python", "-m", "bench.fanout", *argv]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **{k: no_nan(v) for k, v in result.items()},
        }
        with args.json.open("a") as f:
            f.write(json.dumps(record, default=str, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

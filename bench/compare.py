"""Side-by-side benchmark: the gateway, nginx (1:1 proxy), nchan and a naive aiohttp proxy.

Usage: python -m bench.compare --scenario fanout --subscribers 5000
                               --targets gateway,nginx,nchan,naive --duration 20 [--json FILE]

Scenarios (each sets defaults; --subscribers, --topics, --rate, --size, --duration override):

  fanout   1 topic x --subscribers (1,000) at 10 events/s of 200 B
  rate     1 topic x 100 subscribers at --rate (1,000) events/s
  topics   500 topics x 4 subscribers at 2 events/s per topic
  idle     10,000 subscribers, 1 topic at 0.2 events/s: memory per connection
  churn    1 topic x 1,000 subscribers at 10 events/s; --churn (100) streams a second are closed
           during the window and reopened --reopen-delay (0.5) s later with Last-Event-ID

The targets run one after the other on the same load (same subscribers, topics, rate, size,
window), each with a fresh event source and a fresh target process:

  gateway  `python -m gateway` (one route, limits lifted as in bench.fanout) in front of
           `bench.upstream`: one upstream connection per topic.
  nginx    nginx as a 1:1 streaming reverse proxy (proxy_buffering off) in front of
           `bench.upstream`: one upstream connection per subscriber.
  nchan    nginx with the nchan module: subscribers on an EventSource location, and
           `bench.upstream --publish-url` POSTing every event to nchan's publisher location
           (--nchan-ws: over one WebSocket per topic instead).
  naive    `bench.naive_proxy` (aiohttp, one upstream request per client, chunks copied with
           `await resp.write`) in front of `bench.upstream`.

nginx runs from a config file written to the run's temp dir (pid file, logs and temp paths
there too) with `nginx -c CONF -p DIR -g 'daemon off; master_process on;'`, as a child of this
process; --nginx-workers sets worker_processes (default 1: the gateway is one process, so one
worker compares like with like, and keeps nchan free of inter-worker IPC, its best case).

The load client (--client) is the same for every target of a run:

  c        bench/sseload.c (epoll, one thread), built with Debian's gcc into bench/.build by
           `bench.cload` and run as a child process driven over its stdin/stdout; its own CPU
           (getrusage) is the "client CPU" figure, this runner's is reported apart. The default
           when gcc is installed.
  python   `bench.client` (asyncio raw sockets) in this process, whose CPU is the client's.

Either way every target's events carry the bench's `"seq":N` in their data, which the client uses
as the sequence (nchan assigns its own event ids), and a stream that ends is reopened with
Last-Event-ID, as an EventSource would, and counted. Latency sampling differs when one read
carries several events: the C client samples exactly one event in K, the Python client the newest
event of the read in which its countdown runs out, so it under-samples the older events of a burst
(replay after a reopen in churn: its p99 is far lower than the C client's, which weighs every
delivered event alike). With one event per read (fanout, topics at low rates) they agree.

Per target: subscribers connected and failed, deliveries/s, delivery ratio (against subscribers x
rate x window and against what the source actually produced in the window), lost and duplicated
events (sequence gaps and repeats, across reopens), latency p50/p99/max (source send time ->
client receive), CPU seconds per million deliveries of the target (all its processes, from
/proc) and of the source (the upstream serves every client behind a 1:1 proxy), RSS (and PSS)
summed over the target's processes idle and with every subscriber connected, per connection,
upstream connections used, and the load client's own CPU.

Every child is stopped by its PID (SIGTERM, then SIGKILL after a grace period; nginx workers
that outlive their master are killed by their PIDs too), whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import uvloop

from bench import cload
from bench.client import (
    SEQ_RE,
    Load,
    Window,
    connect_all,
    percentile,
    raise_fd_limit,
    wait_first_events,
)
from bench.fanout import (
    GATEWAY_ENV,
    HOST,
    READY_TIMEOUT,
    Child,
    commit,
    cpu_seconds,
    fmt,
    free_port,
    log_problems,
    machine_cpu,
    no_nan,
    start_child,
    upstream_argv,
)

TARGETS = ("gateway", "nginx", "nchan", "naive")
CLIENTS = ("c", "python")
SCENARIOS: dict[str, dict[str, float]] = {
    "fanout": {"subscribers": 1000, "topics": 1, "rate": 10.0, "duration": 20.0},
    "rate": {"subscribers": 100, "topics": 1, "rate": 1000.0, "duration": 20.0},
    "topics": {"subscribers": 2000, "topics": 500, "rate": 2.0, "duration": 20.0},
    "idle": {"subscribers": 10000, "topics": 1, "rate": 0.2, "duration": 10.0},
    "churn": {"subscribers": 1000, "topics": 1, "rate": 10.0, "duration": 20.0},
}
NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
PARALLEL_CONNECTS = 200
CONNECT_TIMEOUT = 10.0
MAX_SAMPLES_PER_SECOND = 2000
NGINX_PROBLEMS = ("[alert]", "[crit]", "[emerg]", "[error]", "[warn]")


# --- /proc -----------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """Live direct children of `pid` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2 :].split()[1] == str(pid):
            found.append(int(entry.name))
    return found


def _status_kib(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over `pids`: RSS counts shared pages once per process, PSS splits them."""
    rss = sum(_status_kib(p, "status", "VmRSS:") for p in pids)
    pss = sum(_status_kib(p, "smaps_rollup", "Pss:") for p in pids)
    return rss, pss


# --- targets ---------------------------------------------------------------------------------


@dataclass
class Running:
    """One target as it runs: its processes, its event source, where subscribers connect."""

    name: str
    main: Child  # the gateway, the naive proxy, or nginx's master
    source: Child  # bench.upstream (serving, or publishing to nchan)
    port: int
    source_port: int
    extra_pids: set[int] = field(default_factory=set)  # nginx workers seen

    def pids(self) -> list[int]:
        kids = child_pids(self.main.pid)
        self.extra_pids.update(kids)
        return [self.main.pid, *kids]

    def stop(self) -> list[str]:
        said = [f"{self.name}: {self.main.name} (pid {self.main.pid}) {self.main.stop()}"]
        for pid in sorted(self.extra_pids):
            if _is_nginx(pid):  # a worker of ours that outlived its master
                os.kill(pid, signal.SIGKILL)
                said.append(f"{self.name}: leftover worker {pid} killed")
        said.append(f"{self.name}: {self.source.name} (pid {self.source.pid}) {self.source.stop()}")
        return said

    def problems(self) -> list[str]:
        if self.name in ("nginx", "nchan"):
            lines = self.main.log_text().splitlines()
            return [line for line in lines if any(k in line for k in NGINX_PROBLEMS)]
        return log_problems(self.main.log_text())


async def source_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The source's /stats; {} if it cannot answer in time (an upstream saturated by a 1:1
    proxy's connections may not), so the rest of the figures survive."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            stats: dict[str, Any] = await resp.json()
            return stats
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"{url}: {type(exc).__name__} {exc}", file=sys.stderr)
        return {}


def _is_nginx(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "nginx"
    except OSError:
        return False


def wait_port(child: Child, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.proc.poll() is not None:
            code = child.proc.returncode
            raise RuntimeError(f"{child.name} exited ({code}):\n{child.log_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not listening within {timeout}s:\n{child.log_text()}")
        time.sleep(0.05)


def nginx_conf(
    kind: str, prefix: Path, port: int, up_port: int, workers: int, nofile: int, ring: int
) -> str:
    if kind == "nginx":
        module = ""
        http_extra = ""
        locations = f"""
        location /events/ {{
            proxy_pass http://{HOST}:{up_port}/stream/;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 1h;
        }}"""
    else:
        module = f"load_module {NGINX_MODULE};\n"
        http_extra = "    nchan_shared_memory_size 256M;\n"
        locations = f"""
        location ~ ^/events/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}
        location ~ ^/pub/([A-Za-z0-9_-]+)$ {{
            nchan_publisher http websocket;
            nchan_channel_id $1;
            nchan_message_buffer_length {ring};
            nchan_message_timeout 300s;
            access_log off;
        }}"""
    return f"""{module}worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {nofile - 64};
}}
http {{
    access_log {prefix}/access.log combined buffer=64k flush=5s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
{http_extra}    server {{
        listen {HOST}:{port} backlog=4096;
{locations}
    }}
}}
"""


def start_target(name: str, args: argparse.Namespace, log_dir: Path) -> Running:
    py = sys.executable
    port, up_port = free_port(), free_port()
    source_argv = upstream_argv(args, up_port)
    started: list[Child] = []
    try:
        if name == "nchan":
            main = start_nginx(name, args, log_dir, port, up_port)
            started.append(main)
            publish = [
                "--publish-url",
                f"http://{HOST}:{port}/pub/{{topic}}",
                "--topics",
                str(args.topics),
            ]
            if args.nchan_ws:
                publish.append("--publish-ws")
            source = start_child("publisher", source_argv + publish, log_dir)
            started.append(source)
            source.wait_ready("listening on", READY_TIMEOUT)
            return Running(name, main, source, port, up_port)
        source = start_child("upstream", source_argv, log_dir)
        started.append(source)
        source.wait_ready("listening on", READY_TIMEOUT)
        upstream_url = f"http://{HOST}:{up_port}/stream/{{topic}}"
        if name == "gateway":
            argv = [py, "-m", "gateway", "--listen", f"{HOST}:{port}", "--path", "/events/{topic}"]
            argv += ["--upstream", upstream_url, "--heartbeat", str(args.heartbeat)]
            main = start_child("gateway", argv, log_dir, GATEWAY_ENV)
            started.append(main)
            main.wait_ready("listening on", READY_TIMEOUT)
        elif name == "naive":
            argv = [py, "-m", "bench.naive_proxy", "--port", str(port), "--upstream", upstream_url]
            main = start_child("naive", argv, log_dir)
            started.append(main)
            main.wait_ready("listening on", READY_TIMEOUT)
        elif name == "nginx":
            main = start_nginx(name, args, log_dir, port, up_port)
            started.append(main)
        else:
            raise ValueError(f"unknown target {name!r}")
        return Running(name, main, source, port, up_port)
    except BaseException:
        for child in reversed(started):
            child.stop()
        raise


def start_nginx(
    kind: str, args: argparse.Namespace, log_dir: Path, port: int, up_port: int
) -> Child:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx libnginx-mod-nchan)")
    if kind == "nchan" and not NGINX_MODULE.exists():
        raise RuntimeError(f"{NGINX_MODULE} missing (apt-get install libnginx-mod-nchan)")
    prefix = log_dir / kind
    prefix.mkdir(parents=True, exist_ok=True)
    # Workers drop to `nobody` when the master runs as root: let them reach the temp paths.
    for p in (log_dir, prefix):
        p.chmod(0o755)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(kind, prefix, port, up_port, args.nginx_workers, nofile, args.ring))
    argv = [nginx, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")]
    argv += ["-g", "daemon off; master_process on;"]
    child = start_child(kind, argv, log_dir)
    # Its own messages go to error.log; the child's log file only gets what nginx prints early.
    child.log = prefix / "error.log"
    wait_port(child, port, READY_TIMEOUT)
    return child


# --- one target's run --------------------------------------------------------------------------


async def churn(load: Load, per_second: float, until: float) -> None:
    """Close `per_second` random open streams a second (in 10 steps), each reopened at once."""
    rng = random.Random(6)
    carry = 0.0
    while time.monotonic() < until:
        carry += per_second / 10
        n, carry = int(carry), carry - int(carry)
        if n and load.conns:
            for conn in rng.sample(load.conns, min(n, len(load.conns))):
                conn.cycle()
        await asyncio.sleep(0.1)


@dataclass
class Measured:
    """One window as a load client saw it."""

    window: Window
    samples: list[float]  # latency samples, seconds, sorted
    client_cpu: float  # the load client's CPU seconds in the window
    client_cpu_user: float  # of which in user space (the rest: in the kernel)
    runner_cpu: float | None = None  # this process's, when the client is another process
    samples_dropped: int = 0  # samples over the client's cap, not kept


class LoadClient(Protocol):
    """What `measure` needs from a load client (`PyClient` or `CClient`)."""

    kind: str

    async def connect(self, within: float) -> tuple[int, dict[str, int]]: ...
    async def wait_first_events(self, within: float) -> int: ...
    async def begin(self) -> None: ...  # start recording; the window starts
    async def end(self) -> Measured: ...  # the window ends; stop recording
    async def churn(self, per_second: float, until: float) -> None: ...
    def reopen_failures(self) -> dict[str, int]: ...
    async def close(self) -> None: ...


class PyClient:
    """`bench.client` in this process: its CPU is this process's."""

    kind = "python"

    def __init__(self, port: int, paths: list[str], k: int, reopen_delay: float) -> None:
        self.port = port
        self.paths = paths
        self.load = Load(sample_every=k, countdown=k, seq_re=SEQ_RE, track_id=True, reconnect=True)
        self.load.cycle_delay = reopen_delay
        self._cpu = 0.0
        self._user = 0.0
        self._snap = self.load.snapshot()

    async def connect(self, within: float) -> tuple[int, dict[str, int]]:
        load = self.load
        try:
            async with asyncio.timeout(within):
                await connect_all(
                    load,
                    HOST,
                    self.port,
                    self.paths,
                    parallel=PARALLEL_CONNECTS,
                    connect_timeout=CONNECT_TIMEOUT,
                )
        except TimeoutError:
            load.failures["connect phase timed out"] += 1
        return len(load.conns), dict(load.failures)

    async def wait_first_events(self, within: float) -> int:
        return await wait_first_events(self.load, within)

    async def begin(self) -> None:
        self._cpu = cpu_seconds("self", children=False)
        self._user = os.times().user
        self.load.recording = True
        self._snap = self.load.snapshot()

    async def end(self) -> Measured:
        snap_b = self.load.snapshot()
        self.load.recording = False
        me = cpu_seconds("self", children=False) - self._cpu
        user = os.times().user - self._user
        return Measured(Window.between(self._snap, snap_b), sorted(self.load.samples), me, user)

    async def churn(self, per_second: float, until: float) -> None:
        await churn(self.load, per_second, until)

    def reopen_failures(self) -> dict[str, int]:
        return dict(self.load.reopen_failures)

    async def close(self) -> None:
        self.load.close_all()


class CClient:
    """bench/sseload.c as a child process (`bench.cload`): its CPU is from its getrusage."""

    kind = "c"

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: cload.CLoad | None = None
        self._snap: cload.CSnapshot | None = None
        self._last: cload.CSnapshot | None = None
        self._runner_cpu = 0.0
        self._closed = False

    def _client(self) -> cload.CLoad:
        assert self.proc is not None
        return self.proc

    async def connect(self, within: float) -> tuple[int, dict[str, int]]:
        self.proc = await cload.CLoad.start(self.argv, self.log)
        print(f"[client] sseload pid {self.proc.pid}, log {self.log}", file=sys.stderr)
        return await self.proc.connect(within)

    async def wait_first_events(self, within: float) -> int:
        return await self._client().wait_first_events(within)

    async def begin(self) -> None:
        self._runner_cpu = cpu_seconds("self", children=False)
        await self._client().record(True)
        self._snap = await self._client().snapshot()

    async def end(self) -> Measured:
        assert self._snap is not None
        snap_b = self._last = await self._client().snapshot()
        await self._client().record(False)
        runner = cpu_seconds("self", children=False) - self._runner_cpu
        return Measured(
            cload.window(self._snap, snap_b),
            sorted(snap_b.samples),
            snap_b.cpu_seconds - self._snap.cpu_seconds,
            snap_b.cpu_user - self._snap.cpu_user,
            runner_cpu=runner,
            samples_dropped=snap_b.samples_dropped,
        )

    async def churn(self, per_second: float, until: float) -> None:
        await self._client().churn(per_second, max(0.0, until - time.monotonic()))
        await asyncio.sleep(max(0.0, until - time.monotonic()))

    def reopen_failures(self) -> dict[str, int]:
        return dict(self._last.reopen_failures) if self._last is not None else {}

    async def close(self) -> None:
        if self.proc is not None and not self._closed:
            self._closed = True
            how = await self.proc.close()
            print(f"[client] sseload (pid {self.proc.pid}) {how}", file=sys.stderr)


def make_client(args: argparse.Namespace, t: Running, k: int, log_dir: Path) -> LoadClient:
    if args.client == "python":
        paths = [f"/events/t{i % args.topics}" for i in range(args.subscribers)]
        return PyClient(t.port, paths, k, args.reopen_delay)
    binary = cload.build()
    argv = cload.argv_for(
        binary,
        port=t.port,
        path="/events/t" if args.topics > 1 else "/events/t0",  # the same paths as above
        n=args.subscribers,
        topics=args.topics,
        sample_every=k,
        seq_from="data",
        reconnect=True,
        cycle_delay=args.reopen_delay,
        parallel=PARALLEL_CONNECTS,
        connect_timeout=CONNECT_TIMEOUT,
        max_seconds=measure_budget(args) + 30,
    )
    return CClient(argv, log_dir / "sseload.log")


def measure_budget(args: argparse.Namespace) -> float:
    """Seconds one target's `measure` may take, whatever happens."""
    return float(args.duration + 150 + args.subscribers / 40 + 3 / args.rate)


async def measure(args: argparse.Namespace, t: Running, log_dir: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    expected_rate = args.subscribers * args.rate
    k = args.sample_every or max(1, math.ceil(expected_rate / MAX_SAMPLES_PER_SECOND))
    paths = [f"/events/t{i % args.topics}" for i in range(args.subscribers)]
    client = make_client(args, t, k, log_dir)
    try:
        return await _measure(args, t, r, k, paths, client)
    finally:
        await client.close()


async def _measure(
    args: argparse.Namespace,
    t: Running,
    r: dict[str, Any],
    k: int,
    paths: list[str],
    client: LoadClient,
) -> dict[str, Any]:
    stats_url = f"http://{HOST}:{t.source_port}/stats"
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(1.0)
        r["rss_idle_kib"], r["pss_idle_kib"] = memory_kib(t.pids())
        r["source_rss_idle_kib"] = memory_kib([t.source.pid])[0]
        t0 = time.monotonic()
        connected, failures = await client.connect(60 + args.subscribers / 50)
        r["connect_seconds"] = round(time.monotonic() - t0, 2)
        r["connected"] = connected
        r["connect_failures"] = failures
        if not connected:
            return r
        t0 = time.monotonic()
        r["no_first_event"] = await client.wait_first_events(10 + 3 / args.rate)
        r["first_event_seconds"] = round(time.monotonic() - t0, 2)
        print(
            f"[{t.name}] connected {r['connected']}/{args.subscribers} in {r['connect_seconds']}s"
            f" (failures {r['connect_failures'] or 0}); streaming after"
            f" {r['first_event_seconds']}s more ({r['no_first_event']} without an event)",
            file=sys.stderr,
        )
        await asyncio.sleep(1.0)  # let the connect burst settle

        pids = t.pids()
        r["rss_start_kib"], r["pss_start_kib"] = memory_kib(pids)
        r["target_processes"] = len(pids)
        stats_a = await source_stats(session, stats_url)
        cpu_a = cpu_seconds(t.main.pid)
        src_a = cpu_seconds(t.source.pid)
        box_a = machine_cpu()
        await client.begin()
        until = time.monotonic() + args.duration
        churner = None
        if args.churn and args.scenario == "churn":
            churner = asyncio.create_task(client.churn(args.churn, until))
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        got = await client.end()
        box_b = machine_cpu()
        cpu_b = cpu_seconds(t.main.pid)
        src_b = cpu_seconds(t.source.pid)
        stats_b = await source_stats(session, stats_url)
        if churner is not None:
            await churner
        r["rss_end_kib"], r["pss_end_kib"] = memory_kib(t.pids())
        r["source_rss_end_kib"] = memory_kib([t.source.pid])[0]
        await client.close()
        await asyncio.sleep(0.5)

    w = got.window
    n = connected
    r["window_seconds"] = round(w.seconds, 3)
    r["deliveries"] = w.events
    r["deliveries_per_second"] = round(w.events / w.seconds, 1)
    r["expected_deliveries"] = round(n * args.rate * w.seconds)
    r["delivery_ratio"] = round(w.events / r["expected_deliveries"], 4)
    produced = {t: stats_b[t]["seq"] - stats_a.get(t, {}).get("seq", 0) for t in stats_b}
    per_topic: dict[str, int] = {}
    for p in paths[:n]:
        per_topic[p.rsplit("/", 1)[1]] = per_topic.get(p.rsplit("/", 1)[1], 0) + 1
    r["source_events_in_window"] = sum(produced.values())
    possible = sum(c * produced.get(topic, 0) for topic, c in per_topic.items())
    answered = bool(stats_a and stats_b)  # a saturated upstream may not answer /stats in time
    r["delivery_ratio_vs_source"] = round(w.events / possible, 4) if possible and answered else None
    r["lost_events"] = w.lost
    r["gaps"] = w.gaps
    r["duplicate_events"] = w.dups
    r["silent_subscribers"] = w.silent
    r["stream_ends"] = w.ends
    r["reopens"] = w.reopens
    r["cycles"] = w.cycles
    r["cycles_per_second"] = round(w.cycles / w.seconds, 1)
    r["reopen_failures"] = client.reopen_failures()
    r["stream_errors"] = w.errors
    lat = got.samples
    r["latency_samples"] = len(lat)
    if got.samples_dropped:
        r["latency_samples_dropped"] = got.samples_dropped
    r["sample_every"] = k
    r["latency_ms_p50"] = round(percentile(lat, 50) * 1e3, 3)
    r["latency_ms_p99"] = round(percentile(lat, 99) * 1e3, 3)
    r["latency_ms_max"] = round(lat[-1] * 1e3, 3) if lat else None
    per_m = w.events / 1e6
    cpu, src, me = cpu_b - cpu_a, src_b - src_a, got.client_cpu
    r["cpu_seconds"] = round(cpu, 2)
    r["cpu_percent"] = round(100 * cpu / w.seconds, 1)
    r["cpu_s_per_million"] = round(cpu / per_m, 3) if w.events else None
    r["source_cpu_seconds"] = round(src, 2)
    r["source_cpu_s_per_million"] = round(src / per_m, 3) if w.events else None
    r["total_cpu_s_per_million"] = round((cpu + src) / per_m, 3) if w.events else None
    r["client_cpu_seconds"] = round(me, 2)
    r["client_cpu_percent"] = round(100 * me / w.seconds, 1)
    r["client_cpu_s_per_million"] = round(me / per_m, 3) if w.events else None
    r["client_cpu_user_seconds"] = round(got.client_cpu_user, 3)
    r["client_cpu_user_s_per_million"] = round(got.client_cpu_user / per_m, 3) if w.events else None
    runner = got.runner_cpu or 0.0  # (the Python client's CPU is this process's: `me`)
    if got.runner_cpu is not None:
        r["runner_cpu_seconds"] = round(runner, 2)
    busy = box_b[0] - box_a[0]
    r["machine_cpu_busy_seconds"] = round(busy, 2)
    r["machine_cpu_capacity_seconds"] = round(box_b[1] - box_a[1], 2)
    r["other_cpu_seconds"] = round(busy - cpu - src - me - runner, 2)
    r["kib_per_connection"] = round((r["rss_start_kib"] - r["rss_idle_kib"]) / n, 2)
    r["pss_kib_per_connection"] = round((r["pss_start_kib"] - r["pss_idle_kib"]) / n, 2)
    grown = r["source_rss_end_kib"] - r["source_rss_idle_kib"]
    r["source_kib_per_connection"] = round(grown / n, 2)
    if t.name == "nchan":
        pub = [v.get("publish_connections", 0) for v in stats_b.values()]
        r["upstream_connections"] = max(pub) if pub else None
        r["publish_errors"] = sum(v.get("publish_errors", 0) for v in stats_b.values())
    else:
        r["upstream_connections"] = (
            sum(v.get("connections", 0) for v in stats_b.values()) if stats_b else None
        )
    return r


def run_target(name: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    target_dir = log_dir / name
    target_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"target": name, "client": args.client}
    running = start_target(name, args, target_dir)
    print(
        f"[{name}] pid {running.main.pid} :{running.port}, source pid {running.source.pid}"
        f" :{running.source_port}, logs in {target_dir}",
        file=sys.stderr,
    )
    try:
        budget = measure_budget(args)
        result.update(uvloop.run(asyncio.wait_for(measure(args, running, target_dir), budget)))
    except Exception as exc:  # one target failing must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] failed: {result['error']}", file=sys.stderr)
    finally:
        result["problems"] = running.problems()[:5]
        for line in running.stop():
            print(line, file=sys.stderr)
    result["log_problems"] = len(running.problems())
    result["source_log_problems"] = len(log_problems(running.source.log_text()))
    return result


# --- the table -----------------------------------------------------------------------------


def rows(args: argparse.Namespace) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    def g(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(r.get(key))

    def pair(a: str, b: str, sep: str = " / ") -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{fmt(r.get(a))}{sep}{fmt(r.get(b))}"

    return [
        ("subscribers connected", lambda r: f"{fmt(r.get('connected'))} / {args.subscribers:,}"),
        ("connect failures", g("connect_failures")),
        ("no first event", g("no_first_event")),
        ("deliveries/s", g("deliveries_per_second")),
        ("delivery ratio (subs x rate)", g("delivery_ratio")),
        ("  vs source's output", g("delivery_ratio_vs_source")),
        ("lost (gaps) / dup", lambda r: f"{fmt(r.get('lost_events'))} ({fmt(r.get('gaps'))})"
         f" / {fmt(r.get('duplicate_events'))}"),
        ("stream ends / reopens", pair("stream_ends", "reopens")),
        ("churn: closed+reopened /s", g("cycles_per_second")),
        ("latency ms p50", g("latency_ms_p50")),
        ("latency ms p99", g("latency_ms_p99")),
        ("latency ms max", g("latency_ms_max")),
        ("target CPU s (% of 1 core)", lambda r: f"{fmt(r.get('cpu_seconds'))}"
         f" ({fmt(r.get('cpu_percent'))}%)"),
        ("target CPU s / M deliveries", g("cpu_s_per_million")),
        ("source CPU s / M deliveries", g("source_cpu_s_per_million")),
        ("target+source CPU s / M", g("total_cpu_s_per_million")),
        ("target RSS KiB idle / connected", pair("rss_idle_kib", "rss_start_kib")),
        ("target KiB / connection (RSS)", g("kib_per_connection")),
        ("target KiB / connection (PSS)", g("pss_kib_per_connection")),
        ("source KiB / connection", g("source_kib_per_connection")),
        ("target processes", g("target_processes")),
        ("upstream connections", g("upstream_connections")),
        ("client CPU s / M events", g("client_cpu_s_per_million")),
        ("  of which user space", g("client_cpu_user_s_per_million")),
        ("client CPU % of 1 core", g("client_cpu_percent")),
        ("machine CPU s busy / capacity", pair("machine_cpu_busy_seconds",
                                               "machine_cpu_capacity_seconds")),
        ("target log problems", g("log_problems")),
        ("error", lambda r: r.get("error") or "-"),
    ]  # fmt: skip


def table(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    spec = rows(args)
    header = ["", *(r["target"] for r in results)]
    body = [[label, *(f(r) for r in results)] for label, f in spec]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    out = []
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


# --- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="fanout")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, in order")
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--topics", type=int)
    parser.add_argument("--rate", type=float, help="events/s per topic")
    parser.add_argument("--size", type=int, default=200, help="event data bytes")
    parser.add_argument("--duration", type=float, help="measurement window, s")
    parser.add_argument("--churn", type=float, default=100.0, help="churn: streams cycled per s")
    parser.add_argument(
        "--reopen-delay", type=float, default=0.5, help="churn: s a cycled stream stays closed"
    )
    parser.add_argument("--heartbeat", type=float, default=15.0, help="gateway --heartbeat")
    parser.add_argument("--nginx-workers", type=int, default=1, help="worker_processes")
    parser.add_argument("--ring", type=int, default=1000, help="nchan message buffer length")
    parser.add_argument("--nchan-ws", action="store_true", help="publish to nchan over WebSocket")
    parser.add_argument(
        "--sample-every", type=int, default=0, metavar="K", help="latency: 1 event in K (0: auto)"
    )
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="c" if cload.compiler() else "python",
        help="load client: c (bench/sseload.c, needs gcc; the default if installed) or python",
    )
    parser.add_argument("--log-dir", type=Path, help="logs and nginx prefixes (default: temp)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="append one JSON line a target")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    for key, value in SCENARIOS[args.scenario].items():
        if getattr(args, key) is None:
            setattr(args, key, type(value)(value) if key != "subscribers" else int(value))
    args.topics = int(args.topics)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        parser.error(f"--targets: choose from {', '.join(TARGETS)} (got {unknown or 'none'})")
    if args.subscribers < 1 or args.rate <= 0 or args.duration <= 0 or args.topics < 1:
        parser.error("--subscribers, --rate, --duration and --topics must be positive")

    nofile = raise_fd_limit()
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sse-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"scenario {args.scenario}: {args.subscribers:,} subscribers, {args.topics} topic(s),"
        f" {fmt(args.rate)} ev/s of {args.size} B, {fmt(args.duration)} s window;"
        f" RLIMIT_NOFILE {nofile}; load client {args.client}; logs in {log_dir}",
        file=sys.stderr,
    )
    results = []
    for i, name in enumerate(targets):
        if i:
            time.sleep(2.0)  # let the previous target's sockets close
        results.append(run_target(name, args, log_dir))
    print()
    print(
        f"scenario {args.scenario}: {args.subscribers:,} subscribers x {args.topics} topic(s),"
        f" {fmt(args.rate)} ev/s/topic, {args.size} B, {fmt(args.duration)} s window,"
        f" nginx workers {args.nginx_workers}, load client {args.client},"
        f" load average before {loadavg}"
    )
    print(table(args, results))
    for r in results:
        for line in r.get("problems", []):
            print(f"  {r['target']} log: {line[:160]}")
    if args.json:
        stamp = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "command": shlex.join(["python", "-m", "bench.compare", *argv]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "loadavg_before": loadavg,
            "log_dir": str(log_dir),
        }
        with args.json.open("a") as f:
            for r in results:
                record = {**stamp, **{k: no_nan(v) for k, v in r.items()}}
                f.write(json.dumps(record, default=str, allow_nan=False) + "\n")
    failed = [r for r in results if r.get("error") or not r.get("connected")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Deploy fault scenario: restart the gateway under load and count what every client lost.

Usage: python -m bench.deploy [--clients 500] [--upstream honour|ignore] [--flow-seconds 5]
                              [--catch-up-timeout 60] [--json FILE] [--log-dir DIR] [--dump FILE]
                              [--drain-seconds S] [--retry-ms MS]

What runs, all on loopback:

* an SSE upstream in this process (aiohttp): one topic, 10 events/s with ids 1, 2, 3...,
  generated from the start whether anyone listens or not, every event kept. With
  ``--upstream honour`` (default) a request carrying ``Last-Event-ID: N`` gets every event
  after N, then the live stream (the replay and the registration for live events happen with no
  await between them, so the upstream itself never loses or repeats one); with ``ignore`` every
  request gets the live stream only. Every request is recorded with its time and Last-Event-ID.
* ``python -m gateway`` as a child, one shared-mode quick-start route ``/events/{topic}`` in
  front of it, every setting at its default (drain 5 s, retry 2-5 s, ring, catch-ups) except the
  metrics, served on the main port so this runner can read them. ``--drain-seconds`` and
  ``--retry-ms`` (a fixed retry) change those two, for quick runs (the smoke test).
* N clients that behave like a browser's EventSource, each on its own source address
  (127.1.x.y, so the gateway's per-address limits see N clients, as in production, without
  lifting any limit): raw sockets, HTTP/1.1 (chunked), an SSE parser that follows the spec's
  field rules (LF or CRLF line ends; the gateway never sends a bare CR), ``retry:`` honoured,
  and after an end, a refused connection or a failed one, a reconnect after the retry delay
  with ``Last-Event-ID`` set to the client's last event id (none until it had one). A status
  other than 200 ends the client for good, as it ends an EventSource.

The run: every client connects; events flow for ``--flow-seconds``; the gateway gets SIGTERM
(it drains in waves over 5 s while events keep flowing, so clients come back holding many
different ids); once it has exited a new gateway starts on the same port at once; the run
waits (at most ``--catch-up-timeout`` s) until every client streams from the new gateway and
holds an id at least the upstream's newest id at the moment they all streamed, lets in-flight
events land for `SETTLE_SECONDS`, then stops.

How the loss is counted, per client, over the ids it received (gap events apart):

* lost = ids after its first received id, up to its highest received id, that it never got.
  Events before a client's first event are not lost (it was not there yet), and events after
  its highest id are not lost either (the run ended; a client that never caught up is counted
  as `not_caught_up`). Each lost id is attributed to the hole it fell in: *announced* when a
  gap event arrived between the ids bounding the hole, *silent* otherwise.
* duplicates = deliveries of an id the client already had; out-of-order = an id lower than
  the highest so far that it did not have yet.
* gap events, by the ``reason`` in their JSON data.

Every loop is bounded in count and time; the only processes stopped are the gateways started
here, by PID. The result is one JSON line (``--json`` appends it to a file too) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import uvloop
from aiohttp import web

from bench.client import raise_fd_limit
from bench.fanout import Child, commit, log_problems, parse_prometheus, start_child

HOST = "127.0.0.1"
TOPIC = "t0"
RATE = 10.0  # events/s: the scenario
# Chrome's reconnection time before a stream sent any `retry:` (Firefox waits 5 s).
DEFAULT_RETRY_MS = 3000
# A browser keeps trying for ever; a benchmark client stops after this many connects.
MAX_CONNECTS = 200
CONNECT_TIMEOUT = 10.0  # TCP connect + response head, per attempt
PARALLEL_FIRST_CONNECTS = 100  # the first wave only; reconnects come when they come
READY_TIMEOUT = 20.0  # a gateway logs "listening on" within this
# SIGTERM to exit: drain (5 s) + shutdown timeout (10 s) + slack; then SIGKILL.
EXIT_TIMEOUT = 25.0
CONNECT_ALL_TIMEOUT = 30.0
SETTLE_SECONDS = 1.0  # after everyone caught up: let events in flight land before counting
POLL = 0.05
MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 1024 * 1024
MAX_LISTED = 50  # catch-up ids listed in the result
GAP = -1  # in a client's record: a gap event
NO_ID = -2  # in a client's record: an event without an integer id of its own


# --- the upstream ------------------------------------------------------------------------------


class HistoryUpstream:
    """One topic, every event kept, Last-Event-ID honoured or ignored; every request recorded."""

    def __init__(self, rate: float, honour: bool) -> None:
        self.rate = rate
        self.honour = honour
        self.frames: list[bytes] = []  # event k (id k) is frames[k - 1]
        # (monotonic time, Last-Event-ID, the first id this response sends)
        self.requests: list[tuple[float, str | None, int]] = []
        self.queues: set[asyncio.Queue[bytes | None]] = set()
        self.runner: web.AppRunner | None = None
        self.task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def latest(self) -> int:
        return len(self.frames)

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/stream/{topic}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, port, reuse_address=True).start()
        self.port = port
        self.task = asyncio.create_task(self._generate(), name="upstream generator")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for queue in self.queues:
            queue.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()

    async def _generate(self) -> None:
        """Event k is due at start + (k - 1) / rate: the schedule never drifts."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            due = int((loop.time() - start) * self.rate) + 1
            parts = []
            while len(self.frames) < due:
                seq = len(self.frames) + 1
                frame = b'id: %d\ndata: {"seq":%d,"t":%.6f}\n\n' % (seq, seq, time.time())
                self.frames.append(frame)
                parts.append(frame)
            if parts:
                batch = b"".join(parts)
                for queue in self.queues:
                    queue.put_nowait(batch)
            await asyncio.sleep(max(0.001, start + len(self.frames) / self.rate - loop.time()))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        last_id = request.headers.get("Last-Event-ID")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        # From here to the registration: no await, so no event falls between replay and live.
        after = self.latest
        if self.honour and last_id is not None and last_id.isdigit():  # else: not ours, live
            after = min(int(last_id), self.latest)
        self.requests.append((time.monotonic(), last_id, after + 1))
        queue.put_nowait(b": hello\n\n" + b"".join(self.frames[after:]))
        self.queues.add(queue)
        try:
            while (data := await queue.get()) is not None:
                await resp.write(data)
        except ConnectionError:
            pass
        finally:
            self.queues.discard(queue)
        return resp


# --- the clients -------------------------------------------------------------------------------


class Dechunker:
    """HTTP/1.1 chunked transfer decoding, fed in pieces; `ended` after the last chunk."""

    def __init__(self) -> None:
        self.left = 0  # >0: data bytes to come; <0: CRLF bytes after the data to skip
        self.pending = b""
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        if self.pending:
            data, self.pending = self.pending + data, b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.ended:
            if self.left > 0:
                take = min(self.left, end - pos)
                out.append(data[pos : pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self.left = -2
            elif self.left < 0:
                skip = min(-self.left, end - pos)
                pos += skip
                self.left += skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.pending = data[pos:]
                    if len(self.pending) > 1024:
                        raise ValueError("chunk-size line too long")
                    break
                size = int(data[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.ended = True
                else:
                    self.left = size
        return b"".join(out)


class Stream(asyncio.Protocol):
    """One HTTP response of one client: head, de-chunking, SSE lines into the client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        loop = asyncio.get_running_loop()
        self.status: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.dechunk: Dechunker | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's implements it
        self.transport.write(self.client.request())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(ConnectionError("closed before the response head"))
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            if not self.status.done():
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > MAX_HEAD_BYTES:
                        raise ValueError("response head too long")
                    return
                block = bytes(self.head[:end]).lower()
                data = bytes(self.head[end + 4 :])
                status = int(block.split(None, 2)[1])
                self.status.set_result(status)
                if status != 200:
                    self.close()
                    return
                if b"\r\ntransfer-encoding: chunked" in block:
                    self.dechunk = Dechunker()
            if self.dechunk is not None:
                data = self.dechunk.feed(data)
            self._lines(data)
            if self.dechunk is not None and self.dechunk.ended:
                self.close()  # the response ended: an EventSource reconnects
        except ValueError as exc:
            self.client.errors[str(exc)[:60]] += 1
            if not self.status.done():
                self.status.set_exception(exc)
            self.close()

    def _lines(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        start = 0
        while (eol := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:eol])
            start = eol + 1
            self.client.line(line[:-1] if line.endswith(b"\r") else line)
        del buf[:start]
        if len(buf) > MAX_LINE_BYTES:
            raise ValueError("line too long")


@dataclass
class Attempt:
    at: float  # monotonic
    last_event_id: str | None
    outcome: str = "connecting"  # streamed | refused | failed | timeout | status NNN


@dataclass
class Client:
    """One EventSource: its state between connections and everything it received."""

    index: int
    port: int
    path: str
    local: str
    stop: asyncio.Event
    last_event_id: str = ""  # the spec's "last event ID string"; "" = send no header
    retry_ms: int = DEFAULT_RETRY_MS
    records: list[int] = field(default_factory=list)  # ids in arrival order; GAP, NO_ID
    gaps: list[tuple[str, str]] = field(default_factory=list)  # (lastEventId, reason)
    attempts: list[Attempt] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    streaming_since: float | None = None  # monotonic, while a 200 stream is open
    highest: int = 0
    gave_up: str | None = None
    stream: Stream | None = None  # the current connection
    # Per response: the spec's parser buffers.
    _data: list[bytes] = field(default_factory=list)
    _event: bytes = b""
    _id_buffer: str = ""
    _own_id: str | None = None

    def request(self) -> bytes:
        extra = f"Last-Event-ID: {self.last_event_id}\r\n" if self.last_event_id else ""
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
        ).encode()

    def line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
                self._own_id = self._id_buffer
        elif name == b"retry" and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self) -> None:
        self.last_event_id = self._id_buffer
        data, event, own_id = self._data, self._event, self._own_id
        self._data, self._event, self._own_id = [], b"", None
        if not data:
            return
        if event == b"gap":
            self.records.append(GAP)
            try:
                info = json.loads(b"\n".join(data))
                self.gaps.append((str(info.get("lastEventId")), str(info.get("reason"))))
            except (ValueError, AttributeError):
                self.gaps.append(("?", "unparsable gap data"))
            return
        try:
            seq = int(own_id) if own_id is not None else NO_ID
        except ValueError:
            seq = NO_ID
        self.records.append(seq)
        if seq > self.highest:
            self.highest = seq

    async def run(self) -> None:
        """Connect, stream, wait `retry`, reconnect: until stopped, refused for good or capped."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_CONNECTS):
            if self.stop.is_set():
                return
            attempt = Attempt(time.monotonic(), self.last_event_id or None)
            self.attempts.append(attempt)
            self._data, self._event, self._own_id = [], b"", None
            self._id_buffer = self.last_event_id
            stream = self.stream = Stream(self)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.create_connection(
                        functools.partial(_same, stream),
                        HOST,
                        self.port,
                        local_addr=(self.local, 0),
                    )
                    status = await stream.status
            except ConnectionRefusedError:
                attempt.outcome = "refused"
            except TimeoutError:
                attempt.outcome = "timeout"
                stream.close()
            except (OSError, ValueError):
                attempt.outcome = "failed"
                stream.close()
            else:
                if status != 200:
                    attempt.outcome = f"status {status}"
                    self.gave_up = attempt.outcome  # EventSource: final
                    return
                attempt.outcome = "streamed"
                self.streaming_since = time.monotonic()
                try:
                    await stream.ended
                finally:
                    self.streaming_since = None
            if self.stop.is_set():
                return
            try:
                async with asyncio.timeout(self.retry_ms / 1000):
                    await self.stop.wait()
                return
            except TimeoutError:
                pass
        self.gave_up = f"{MAX_CONNECTS} connects"


def _same(stream: Stream) -> Stream:
    return stream


def source_address(index: int) -> str:
    """A loopback source address of its own per client (the whole 127/8 is loopback)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


# --- the gateway -------------------------------------------------------------------------------


def listen_port() -> int:
    """A free port below Linux's ephemeral range, so no outgoing connection can take it
    while the gateway restarts."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


GATEWAY_ENV = {
    # Metrics on the main port, so the runner reads them there (the default listener's port may
    # be held by some other gateway on this machine).
    "SSE_GATEWAY_METRICS_LISTEN": "",
}


def gateway_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(GATEWAY_ENV)
    if args.drain_seconds is not None:
        env["SSE_GATEWAY_SERVER_DRAIN_SECONDS"] = str(args.drain_seconds)
    if args.retry_ms is not None:
        env["SSE_GATEWAY_DEFAULTS_RETRY_MS"] = str(args.retry_ms)
        env["SSE_GATEWAY_DEFAULTS_RETRY_MAX_MS"] = str(args.retry_ms)
    return env


async def start_gateway(
    name: str, port: int, up_port: int, log_dir: Path, env: dict[str, str]
) -> Child:
    argv = [sys.executable, "-m", "gateway", "--listen", f"{HOST}:{port}"]
    argv += ["--path", "/events/{topic}", "--upstream", f"http://{HOST}:{up_port}/stream/{{topic}}"]
    child = start_child(name, argv, log_dir, env)
    deadline = time.monotonic() + READY_TIMEOUT
    while "listening on" not in child.log_text():
        if child.proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({child.proc.returncode}):\n{child.log_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready within {READY_TIMEOUT}s:\n{child.log_text()}")
        await asyncio.sleep(POLL)
    return child


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    # A Popen child signals nothing to the loop: poll it (SIGCHLD is the loop's business).
    while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(POLL)
    return proc.poll()


async def stop_gateway(child: Child) -> str:
    """SIGTERM by PID, a second SIGTERM (exit at once) after 1 s, SIGKILL after 10 s."""
    proc: subprocess.Popen[bytes] = child.proc
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    os.kill(proc.pid, signal.SIGTERM)
    if (code := await wait_exit(proc, 1.0)) is not None:
        return f"exited {code}"
    os.kill(proc.pid, signal.SIGTERM)
    if (code := await wait_exit(proc, 10.0)) is not None:
        return f"exited {code} after a second SIGTERM"
    os.kill(proc.pid, signal.SIGKILL)
    await wait_exit(proc, 10.0)
    return "killed"


async def gateway_metrics(port: int) -> dict[str, float]:
    """Totals of a few counters over every label (one route anyway)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://{HOST}:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp,
        ):
            samples = parse_prometheus(await resp.text())
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    for key, value in samples.items():
        name = key.split("{", 1)[0]
        if name in (
            "sse_gateway_gaps_total",
            "sse_gateway_catchup_requests_total",
            "sse_gateway_replayed_events_total",
        ):
            out[name] = out.get(name, 0) + value
        elif name == "sse_gateway_replays_total":
            outcome = key.split('outcome="', 1)[1].split('"', 1)[0] if "outcome=" in key else "?"
            out[f"replays_{outcome}"] = out.get(f"replays_{outcome}", 0) + value
    return out


# --- counting ----------------------------------------------------------------------------------


@dataclass
class Tally:
    received: int = 0
    lost: int = 0
    lost_announced: int = 0
    lost_silent: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    no_id: int = 0
    missing: list[int] = field(default_factory=list)


def tally(records: Sequence[int]) -> Tally:
    """Count one client's record (ids in arrival order, GAP markers): see the module doc."""
    t = Tally()
    seen: set[int] = set()
    highest = 0
    first = 0
    gap_since_highest = False
    holes: list[tuple[int, int, bool]] = []  # (lo, hi, announced): ids lo..hi were skipped
    for seq in records:
        if seq == GAP:
            gap_since_highest = True
            continue
        if seq == NO_ID:
            t.no_id += 1
            continue
        t.received += 1
        if seq in seen:
            t.duplicates += 1
            continue
        seen.add(seq)
        if not first:
            first = highest = seq
            gap_since_highest = False
        elif seq < highest:
            t.out_of_order += 1
        else:
            if seq > highest + 1:
                holes.append((highest + 1, seq - 1, gap_since_highest))
            highest = seq
            gap_since_highest = False
    if not first:
        return t
    lows = [lo for lo, _, _ in holes]
    t.missing = sorted(set(range(first, highest + 1)) - seen)
    for missing in t.missing:
        at = bisect.bisect_right(lows, missing) - 1
        t.lost += 1
        if at >= 0 and holes[at][2] and missing <= holes[at][1]:
            t.lost_announced += 1
        else:
            t.lost_silent += 1
    return t


def report(
    args: argparse.Namespace,
    clients: list[Client],
    upstream: HistoryUpstream,
    marks: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    term, restart = marks["sigterm"], marks["restart"]

    def rel(at: float | None) -> float | None:
        return None if at is None else round(at - restart, 3)

    tallies = [tally(c.records) for c in clients]
    held = [next((a.last_event_id for a in c.attempts if a.at >= term), "none") for c in clients]
    reasons: Counter[str] = Counter(reason for c in clients for _, reason in c.gaps)
    after = [(at, lei) for at, lei, _ in upstream.requests if at >= restart]
    during = [(at, lei) for at, lei, _ in upstream.requests if term <= at < restart]
    live_from = [first for at, lei, first in upstream.requests if at >= restart and lei is None]
    caught = [c for c in clients if c.highest >= marks.get("target", float("inf"))]
    outcomes: Counter[str] = Counter(a.outcome for c in clients for a in c.attempts if a.at >= term)
    r: dict[str, Any] = {
        "bench": "deploy",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "upstream": args.upstream,
        "clients": len(clients),
        "flow_seconds": args.flow_seconds,
        "drain_seconds": "default" if args.drain_seconds is None else args.drain_seconds,
        "retry_ms": "default" if args.retry_ms is None else args.retry_ms,
        "rate": RATE,
        "upstream_latest_id": upstream.latest,
        "distinct_ids_held_at_old_exit": extra.pop("distinct_ids_held_at_old_exit", None),
        "distinct_last_event_ids_at_reconnect": len({h for h in held if h not in (None, "none")}),
        "clients_reconnecting_without_id": sum(1 for h in held if h is None),
        "clients_not_reconnected": sum(1 for h in held if h == "none"),
        "events_received": sum(t.received for t in tallies),
        "events_lost": sum(t.lost for t in tallies),
        "events_lost_announced": sum(t.lost_announced for t in tallies),
        "events_lost_silent": sum(t.lost_silent for t in tallies),
        "clients_with_loss": sum(1 for t in tallies if t.lost),
        "duplicates": sum(t.duplicates for t in tallies),
        "clients_with_duplicates": sum(1 for t in tallies if t.duplicates),
        "out_of_order": sum(t.out_of_order for t in tallies),
        "events_without_id": sum(t.no_id for t in tallies),
        "gap_events": sum(len(c.gaps) for c in clients),
        "gap_reasons": dict(reasons.most_common()),
        "clients_with_gap": sum(1 for c in clients if c.gaps),
        "upstream_requests_during_drain": {
            "live": sum(1 for _, lei in during if lei is None),
            "catch_up": sum(1 for _, lei in during if lei is not None),
        },
        "upstream_requests_after_restart": {
            "live": sum(1 for _, lei in after if lei is None),
            "catch_up": sum(1 for _, lei in after if lei is not None),
            "catch_up_distinct_ids": len({lei for _, lei in after if lei is not None}),
            "catch_up_ids": [lei for _, lei in after if lei is not None][:MAX_LISTED],
            "first_live_request_from_id": live_from[0] if live_from else None,
        },
        "reconnect_attempts_after_sigterm": dict(outcomes.most_common()),
        "drain_to_exit_seconds": round(marks["exited"] - term, 3),
        "restart_to_ready_seconds": round(marks["ready"] - restart, 3),
        "restart_to_all_streaming_seconds": rel(marks.get("all_streaming")),
        "restart_to_all_caught_up_seconds": rel(marks.get("all_caught_up")),
        "caught_up_target_id": marks.get("target"),
        "clients_caught_up": len(caught),
        "clients_not_caught_up": len(clients) - len(caught),
        "clients_gave_up": sum(1 for c in clients if c.gave_up),
        "gave_up_reasons": dict(Counter(c.gave_up for c in clients if c.gave_up)),
        "client_parse_errors": dict(sum((c.errors for c in clients), Counter())),
    }
    r.update(extra)
    if args.dump is not None:
        with args.dump.open("w") as f:
            for c, t in zip(clients, tallies, strict=True):
                row = {
                    "client": c.index,
                    "lost": t.lost,
                    "silent": t.lost_silent,
                    "dups": t.duplicates,
                    "records": c.records,
                    "gaps": c.gaps,
                    "missing": t.missing,
                    "connects": [
                        (round(a.at - restart, 3), a.last_event_id, a.outcome) for a in c.attempts
                    ],
                }
                f.write(json.dumps(row) + "\n")
    return r


def table(r: dict[str, Any]) -> str:
    rows = [
        ("clients / upstream", f"{r['clients']} / {r['upstream']} Last-Event-ID"),
        ("upstream newest id at end", r["upstream_latest_id"]),
        ("distinct Last-Event-IDs at reconnect", r["distinct_last_event_ids_at_reconnect"]),
        ("  reconnecting with no id", r["clients_reconnecting_without_id"]),
        ("events received", r["events_received"]),
        (
            "events LOST (announced / silent)",
            f"{r['events_lost']} ({r['events_lost_announced']} / {r['events_lost_silent']})"
            f" in {r['clients_with_loss']} clients",
        ),
        ("duplicates", f"{r['duplicates']} in {r['clients_with_duplicates']} clients"),
        ("out of order", r["out_of_order"]),
        ("gap events", f"{r['gap_events']} in {r['clients_with_gap']} clients"),
        ("  reasons", ", ".join(f"{k} {v}" for k, v in r["gap_reasons"].items()) or "-"),
        ("upstream requests during drain", _split(r["upstream_requests_during_drain"])),
        ("upstream requests after restart", _split(r["upstream_requests_after_restart"])),
        ("reconnect attempts after SIGTERM", _outcomes(r["reconnect_attempts_after_sigterm"])),
        ("SIGTERM -> old gateway exited", f"{r['drain_to_exit_seconds']} s"),
        ("restart -> new gateway listening", f"{r['restart_to_ready_seconds']} s"),
        ("restart -> all clients streaming", _secs(r["restart_to_all_streaming_seconds"])),
        ("restart -> all caught up", _secs(r["restart_to_all_caught_up_seconds"])),
        ("clients not caught up", r["clients_not_caught_up"]),
        ("clients gave up", f"{r['clients_gave_up']} {r['gave_up_reasons'] or ''}".strip()),
        ("gateway (new) metrics", r.get("gateway_metrics", {})),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _split(d: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())


def _outcomes(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _secs(value: float | None) -> str:
    return "never (timed out)" if value is None else f"{value} s"


# --- the run -----------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Poll: the conditions span hundreds of clients, and POLL is the time resolution wanted."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    upstream = HistoryUpstream(RATE, honour=args.upstream == "honour")
    up_port, port = listen_port(), listen_port()
    await upstream.start(up_port)
    stop = asyncio.Event()
    clients = [
        Client(i, port, f"/events/{TOPIC}", source_address(i), stop) for i in range(args.clients)
    ]
    tasks: list[asyncio.Task[None]] = []
    gateways: list[Child] = []
    marks: dict[str, float] = {}
    extra: dict[str, Any] = {}
    env = gateway_env(args)
    try:
        gateways.append(await start_gateway("gateway-old", port, up_port, log_dir, env))
        for i, client in enumerate(clients):
            tasks.append(asyncio.create_task(client.run(), name=f"client {i}"))
            if i % PARALLEL_FIRST_CONNECTS == PARALLEL_FIRST_CONNECTS - 1:
                await asyncio.sleep(0.1)  # a first wave in steps, not one SYN burst
        if not await until(
            lambda: all(c.streaming_since or c.gave_up for c in clients), CONNECT_ALL_TIMEOUT
        ):
            print("warning: not every client streams before the flow", file=sys.stderr)
        extra["streaming_before_sigterm"] = sum(1 for c in clients if c.streaming_since)
        await asyncio.sleep(args.flow_seconds)
        old = gateways[0]
        marks["sigterm"] = time.monotonic()
        os.kill(old.pid, signal.SIGTERM)
        code = await wait_exit(old.proc, EXIT_TIMEOUT)
        if code is None:
            os.kill(old.pid, signal.SIGKILL)
            code = await wait_exit(old.proc, 10)
            extra["old_gateway_killed"] = True
        marks["exited"] = time.monotonic()
        extra["distinct_ids_held_at_old_exit"] = len({c.last_event_id for c in clients})
        extra["old_gateway_exit"] = code
        marks["restart"] = time.monotonic()
        gateways.append(await start_gateway("gateway-new", port, up_port, log_dir, env))
        marks["ready"] = time.monotonic()
        restart = marks["restart"]

        def all_streaming() -> bool:
            return all(
                c.gave_up or (c.streaming_since is not None and c.streaming_since >= restart)
                for c in clients
            )

        deadline = restart + args.catch_up_timeout
        if await until(all_streaming, deadline - time.monotonic()):
            marks["all_streaming"] = time.monotonic()
            target = marks["target"] = upstream.latest
            if await until(
                lambda: all(c.gave_up or c.highest >= target for c in clients),
                deadline - time.monotonic(),
            ):
                marks["all_caught_up"] = time.monotonic()
        marks.setdefault("target", upstream.latest)
        await asyncio.sleep(SETTLE_SECONDS)
        extra["gateway_metrics"] = await gateway_metrics(port)
    finally:
        stop.set()
        for client in clients:  # stop listening first: what the gateway does next is not counted
            if client.stream is not None:
                client.stream.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        extra["gateways"] = {g.name: await stop_gateway(g) for g in gateways}
        problems = [p for g in gateways for p in log_problems(g.log_text())]
        extra["gateway_log_problems"] = len(problems)
        if problems:
            print("gateway log problems:\n  " + "\n  ".join(problems[:10]), file=sys.stderr)
        await upstream.stop()
    return report(args, clients, upstream, marks, extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--upstream", choices=("honour", "ignore"), default="honour")
    parser.add_argument("--flow-seconds", type=float, default=5.0)
    parser.add_argument("--catch-up-timeout", type=float, default=60.0)
    parser.add_argument(
        "--drain-seconds",
        type=float,
        help="gateway drain window (default: the gateway's own default, 5 s)",
    )
    parser.add_argument(
        "--retry-ms",
        type=int,
        help="gateway retry hint, fixed (default: the gateway's own, drawn from 2000-5000 ms)",
    )
    parser.add_argument("--json", type=Path, help="append the result line to this file")
    parser.add_argument("--log-dir", type=Path, help="gateway logs (default: a temp dir)")
    parser.add_argument(
        "--dump", type=Path, help="write every client's record (ids, gaps, connects) here"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 60_000:
        parser.error("--clients must be within 1..60000")
    limit = raise_fd_limit()
    if limit < args.clients + 100:
        parser.error(f"open-file limit {limit} is too low for {args.clients} clients")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench.deploy: {args.clients} clients, upstream {args.upstream}, logs in {log_dir}")
    result = uvloop.run(run(args, log_dir))
    print(table(result))
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(line + "\n")
    if result["events_lost"] or result["duplicates"]:
        print(
            f"!!! {result['events_lost']} EVENTS LOST ({result['events_lost_silent']} silently)"
            f" AND {result['duplicates']} DUPLICATED over the run !!!",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A cheap SSE load client: many raw-socket connections, counting events by their ``id``.

Usage: python -m bench.client --url http://127.0.0.1:PORT/events/t0 [-n 1000] [--duration 10]
                              [--topics 1] [--sample-every K] [--http10]

Each connection is an asyncio `Protocol` (no aiohttp on the read path). It sends
``GET path HTTP/1.1`` (or ``HTTP/1.0`` with ``--http10``), checks for a 200, then for every read:

* HTTP/1.1: de-chunks with a small state machine (a chunk-size line may arrive split from its
  data, or several chunks in one read; both are handled). HTTP/1.0: the gateway sends the bare
  stream (no framing, end = close), which is the cheapest to read.
* keeps the bytes after the last blank line (``\\n\\n``) for the next read, and runs one regex
  over the completed events to extract their ``id: <seq>`` lines. Comments (heartbeats), the
  ``retry:`` preamble and ``data`` lines never match.
* per connection: events received, last seq, lost events (sum of forward seq jumps), gaps (how
  many jumps), duplicates (a seq <= the last one). The seq is the event's ``id`` by default;
  with ``Load(seq_re=SEQ_RE)`` it is the ``"seq":`` field of the bench data instead (for servers
  such as nchan that assign their own ids).
* latency: one event in every `sample_every` (counted over all connections) has its send time
  (``"t":`` from the bench upstream) parsed; the sample is receive time - send time, where the
  receive time is taken when the read is processed (so it includes this client's own loop delay).
* optionally (``Load(reconnect=True)``) a stream that ends is reopened like an EventSource would,
  with ``Last-Event-ID`` set to the last ``id:`` seen (``Load(track_id=True)``); the counters carry
  over, so events lost or repeated across the reconnect show up as gaps or duplicates.
  `SSEConnection.cycle()` closes a stream on purpose and reopens it the same way (churn).

Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import uvloop

ID_RE = re.compile(rb"^id: (\d+)$", re.MULTILINE)
SEQ_RE = re.compile(rb'"seq":(\d+)')
T_RE = re.compile(rb'"t":(\d+\.\d+)')
REOPEN_ATTEMPTS = 20  # a stream that cannot be reopened after this many tries stays closed
REOPEN_DELAY = 0.5  # seconds between tries after a failure (an end is retried at once)
REOPEN_TASKS: set[asyncio.Task[None]] = set()  # strong references while they run
# Bounds on what one connection buffers: a stream that breaks them is a protocol failure.
MAX_HEADER_BYTES = 64 * 1024
MAX_TAIL_BYTES = 4 * 1024 * 1024
MAX_CHUNK_LINE_BYTES = 1024
LOOPBACK = ("127.0.0.1", "localhost")


class StreamFailure(Exception):
    """The response was not a 200 SSE stream, or its framing was broken."""


@dataclass
class Load:
    """State shared by every connection of one run."""

    sample_every: int = 1
    recording: bool = False
    samples: list[float] = field(default_factory=list)
    conns: list[SSEConnection] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    countdown: int = 1
    seq_re: re.Pattern[bytes] = ID_RE
    track_id: bool = False  # remember each stream's last `id:` value (for Last-Event-ID)
    reconnect: bool = False  # reopen a stream that ends, as an EventSource would
    cycle_delay: float = 0.0  # seconds a stream closed by `cycle()` stays closed
    stopping: bool = False
    reopen_failures: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> Snapshot:
        conns = self.conns
        return Snapshot(
            at=time.monotonic(),
            per_conn=[c.events for c in conns],
            lost=sum(c.lost for c in conns),
            gaps=sum(c.gaps for c in conns),
            dups=sum(c.dups for c in conns),
            closed=sum(1 for c in conns if c.closed),
            errors=sum(1 for c in conns if c.error is not None),
            ends=sum(c.ends for c in conns),
            reopens=sum(c.reopens for c in conns),
            cycles=sum(c.cycles for c in conns),
        )

    def close_all(self) -> None:
        self.stopping = True
        for conn in self.conns:
            conn.close()


@dataclass
class Snapshot:
    at: float
    per_conn: list[int]
    lost: int
    gaps: int
    dups: int
    closed: int
    errors: int
    ends: int = 0
    reopens: int = 0
    cycles: int = 0

    @property
    def events(self) -> int:
        return sum(self.per_conn)


@dataclass
class Window:
    """What happened between two snapshots of the same connections."""

    seconds: float
    events: int
    lost: int
    gaps: int
    dups: int
    closed: int
    errors: int
    silent: int  # connections that received nothing in the window
    ends: int = 0  # streams the server ended (not closed by us)
    reopens: int = 0  # streams reopened (after an end or a cycle)
    cycles: int = 0  # streams closed on purpose to be reopened (churn)

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Window:
        n = len(a.per_conn)
        per = [y - x for x, y in zip(a.per_conn, b.per_conn[:n], strict=True)]
        return cls(
            seconds=b.at - a.at,
            events=sum(per),
            lost=b.lost - a.lost,
            gaps=b.gaps - a.gaps,
            dups=b.dups - a.dups,
            closed=b.closed - a.closed,
            errors=b.errors - a.errors,
            silent=sum(1 for d in per if d == 0),
            ends=b.ends - a.ends,
            reopens=b.reopens - a.reopens,
            cycles=b.cycles - a.cycles,
        )


class SSEConnection(asyncio.Protocol):
    __slots__ = (
        "_chunk_left",
        "_chunk_pending",
        "_chunked",
        "_cycling",
        "_head",
        "_reopening",
        "_request",
        "_stopped",
        "_tail",
        "_target",
        "_transport",
        "closed",
        "cycles",
        "dups",
        "ends",
        "error",
        "events",
        "first_seq",
        "gaps",
        "last_id",
        "last_seq",
        "load",
        "lost",
        "ready",
        "reopens",
    )

    def __init__(
        self, load: Load, request: bytes, target: tuple[str, int, str, bool] | None = None
    ) -> None:
        self.load = load
        self._request = request
        self._target = target  # (host, port, path, http10): needed to reopen
        self._stopped = False
        self._cycling = False
        self._reopening = False
        self._transport: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray()  # None once the headers are in
        self._chunked = False
        # >0: chunk data bytes still to come; <0: CRLF bytes after chunk data to skip.
        self._chunk_left = 0
        self._chunk_pending = b""
        self._tail = b""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.events = 0
        self.first_seq = -1
        self.last_seq = -1
        self.lost = 0
        self.gaps = 0
        self.dups = 0
        self.closed = False
        self.error: str | None = None
        self.last_id = b""
        self.ends = 0
        self.reopens = 0
        self.cycles = 0

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the response headers"))
        if self._stopped or self.load.stopping or self._target is None or self._reopening:
            return  # (a failed reopen attempt is retried by `_reopen` itself)
        if self._cycling:
            self._start_reopen()
        elif self.load.reconnect and self.ready.done() and self.ready.exception() is None:
            self.ends += 1
            self._start_reopen()

    def _start_reopen(self) -> None:
        self._reopening = True
        task = asyncio.get_running_loop().create_task(self._reopen())
        REOPEN_TASKS.add(task)
        task.add_done_callback(REOPEN_TASKS.discard)

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            data = self._headers(data)
            if not data:
                return
        try:
            if self._chunked:
                data = self._dechunk(data)
            self._body(data)
        except StreamFailure as exc:
            self._fail(str(exc))

    # --- parsing ------------------------------------------------------------------

    def _headers(self, data: bytes) -> bytes:
        head = self._head
        assert head is not None
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEADER_BYTES:
                self._fail("response headers too long")
            return b""
        block = bytes(head[:end]).lower()
        rest = bytes(head[end + 4 :])
        self._head = None
        status_line = block.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or parts[1] != b"200":
            self._fail(f"status {status_line.decode('latin-1')!r}")
            return b""
        self._chunked = b"\r\ntransfer-encoding: chunked" in block
        if not self.ready.done():
            self.ready.set_result(None)
        return rest

    def _dechunk(self, data: bytes) -> bytes:
        if self._chunk_pending:
            data = self._chunk_pending + data
            self._chunk_pending = b""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        left = self._chunk_left
        while pos < end:
            if left > 0:
                take = min(left, end - pos)
                out.append(data if take == end else data[pos : pos + take])
                pos += take
                left -= take
                if left == 0:
                    left = -2
            elif left < 0:
                skip = min(-left, end - pos)
                pos += skip
                left += skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._chunk_pending = data[pos:]
                    if len(self._chunk_pending) > MAX_CHUNK_LINE_BYTES:
                        raise StreamFailure("chunk-size line too long")
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise StreamFailure(f"bad chunk-size line {data[pos:eol][:40]!r}") from None
                pos = eol + 2
                if size == 0:
                    break  # last chunk: the stream ended (the close follows)
                left = size
        self._chunk_left = left
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _body(self, data: bytes) -> None:
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            if len(buf) > MAX_TAIL_BYTES:
                raise StreamFailure("no event end within the tail limit")
            self._tail = buf
            return
        cut += 2
        if cut == len(buf):
            done = buf
            self._tail = b""
        else:
            done = buf[:cut]
            self._tail = buf[cut:]
        load = self.load
        ids = load.seq_re.findall(done)
        if not ids:
            return
        if load.track_id:
            at = done.rfind(b"\nid: ")
            at = at + 1 if at >= 0 else (0 if done.startswith(b"id: ") else -1)
            if at >= 0:
                self.last_id = done[at + 4 : done.find(b"\n", at)]
        n = len(ids)
        self.events += n
        last = self.last_seq
        if last < 0:
            self.first_seq = int(ids[0])
        for raw in ids:
            seq = int(raw)
            if seq > last:
                if last >= 0 and seq != last + 1:
                    self.lost += seq - last - 1
                    self.gaps += 1
                last = seq
            else:
                self.dups += 1
        self.last_seq = last
        load.countdown -= n
        if load.countdown <= 0:
            load.countdown = load.sample_every
            if load.recording:
                m = T_RE.match(done, max(0, done.rfind(b'"t":')))
                if m is not None:
                    load.samples.append(time.time() - float(m.group(1)))

    # --- ending ---------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if not self.ready.done():
            self.ready.set_exception(StreamFailure(reason))
        self.abort()

    def close(self) -> None:
        self._stopped = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def cycle(self) -> bool:
        """Close this stream on purpose and reopen it with Last-Event-ID (churn)."""
        if self.closed or self._cycling or self._stopped or self._transport is None:
            return False
        self._cycling = True
        self.cycles += 1
        self._transport.close()
        return True

    async def _reopen(self) -> None:
        """Reconnect with this object as the protocol again; counters carry over."""
        assert self._target is not None
        host, port, path, http10 = self._target
        loop = asyncio.get_running_loop()
        if self._cycling and self.load.cycle_delay > 0:
            await asyncio.sleep(self.load.cycle_delay)
        for attempt in range(REOPEN_ATTEMPTS):
            if self._stopped or self.load.stopping:
                break
            if attempt:
                await asyncio.sleep(REOPEN_DELAY)
            self._head = bytearray()
            self._chunked = False
            self._chunk_left = 0
            self._chunk_pending = b""
            self._tail = b""
            self._transport = None
            self.ready = loop.create_future()
            self._request = request_bytes(host, port, path, http10, self.last_id or None)
            try:
                async with asyncio.timeout(10.0):
                    await loop.create_connection(lambda: self, host, port)
                    await self.ready
            except (OSError, TimeoutError, StreamFailure) as exc:
                self.load.reopen_failures[type(exc).__name__] += 1
                # Set by connection_made meanwhile, which mypy cannot see from here.
                transport: asyncio.Transport | None = getattr(self, "_transport")  # noqa: B009
                if transport is not None:
                    transport.abort()
                continue
            self._cycling = self._reopening = False
            self.closed = False
            self.reopens += 1
            return
        self._cycling = self._reopening = False

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def request_bytes(
    host: str, port: int, path: str, http10: bool, last_event_id: bytes | None = None
) -> bytes:
    version = b"HTTP/1.0" if http10 else b"HTTP/1.1"
    extra = b"Last-Event-ID: %b\r\n" % last_event_id if last_event_id else b""
    return b"GET %b %b\r\nHost: %b:%d\r\nAccept: text/event-stream\r\n%b\r\n" % (
        path.encode(),
        version,
        host.encode(),
        port,
        extra,
    )


def loopback_target(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an http://127.0.0.1 URL; anything else is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"only http://127.0.0.1 URLs are allowed, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return "127.0.0.1", parts.port or 80, path


async def connect_all(
    load: Load,
    host: str,
    port: int,
    paths: Sequence[str],
    *,
    http10: bool = False,
    parallel: int = 200,
    connect_timeout: float = 10.0,
) -> None:
    """Open one stream per path, at most `parallel` connecting at once.

    Each gets `connect_timeout` seconds for the TCP connect and the response headers. Successes
    go to `load.conns`, failures are counted by kind in `load.failures`.
    """
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)

    async def one(path: str) -> None:
        async with sem:
            conn = SSEConnection(
                load, request_bytes(host, port, path, http10), (host, port, path, http10)
            )
            try:
                async with asyncio.timeout(connect_timeout):
                    await loop.create_connection(lambda: conn, host, port)
                    await conn.ready
            except (OSError, TimeoutError, StreamFailure) as exc:
                load.failures[type(exc).__name__] += 1
                conn.abort()
                return
            load.conns.append(conn)

    await asyncio.gather(*(one(p) for p in paths))


async def wait_first_events(load: Load, within: float) -> int:
    """Wait until every open connection has an event; return how many still have none."""
    deadline = time.monotonic() + within
    while True:
        waiting = sum(1 for c in load.conns if c.events == 0 and not c.closed)
        if waiting == 0 or time.monotonic() >= deadline:
            return waiting
        await asyncio.sleep(0.05)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def topic_paths(path: str, n: int, topics: int) -> list[str]:
    """n paths spread round-robin over `topics` topics: a trailing segment gets a suffix."""
    if topics <= 1:
        return [path] * n
    return [f"{path}{i % topics}" for i in range(n)]


async def run(args: argparse.Namespace) -> None:
    host, port, path = loopback_target(args.url)
    load = Load(sample_every=args.sample_every, countdown=args.sample_every)
    paths = topic_paths(path, args.n, args.topics)
    t0 = time.monotonic()
    try:
        await connect_all(load, host, port, paths, http10=args.http10, connect_timeout=args.timeout)
        print(
            f"connected {len(load.conns)}/{args.n} in {time.monotonic() - t0:.1f}s,"
            f" failures {dict(load.failures)}",
            file=sys.stderr,
        )
        missing = await wait_first_events(load, args.timeout)
        cpu0 = time.process_time()
        load.recording = True
        a = load.snapshot()
        await asyncio.sleep(args.duration)
        b = load.snapshot()
        load.recording = False
        cpu = time.process_time() - cpu0
    finally:
        load.close_all()
    w = Window.between(a, b)
    lat = sorted(load.samples)
    print(f"connections      {len(load.conns)} (no first event: {missing})")
    print(f"events/s         {w.events / w.seconds:,.0f}")
    print(f"lost / dups      {w.lost} ({w.gaps} gaps) / {w.dups}")
    print(f"closed / silent  {w.closed} / {w.silent}")
    print(
        f"latency ms       p50 {percentile(lat, 50) * 1e3:.2f}  p99 {percentile(lat, 99) * 1e3:.2f}"
        f"  max {(lat[-1] if lat else float('nan')) * 1e3:.2f}  ({len(lat)} samples)"
    )
    per_m = cpu / (w.events / 1e6) if w.events else float("nan")
    print(f"client CPU       {cpu:.2f}s = {per_m:.2f} s per million events")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path")
    parser.add_argument("-n", type=int, default=100, help="connections")
    parser.add_argument("--topics", type=int, default=1, help="append 0..T-1 to the URL path")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sample-every", type=int, default=10, metavar="K")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--http10", action="store_true", help="request HTTP/1.0 (no chunking)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    uvloop.run(asyncio.wait_for(run(args), args.duration + 4 * args.timeout + 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())

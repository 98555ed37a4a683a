"""Test doubles that are real: an SSE upstream on a loopback socket, SSE clients, a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.core.route import Target
from gateway.core.topic import Topic, UpstreamSink
from gateway.edge.stream import Downstream
from gateway.metrics import Metrics
from gateway.sse import Event, Parser, encode_many


class Changes:
    """Wake every waiter on each change; a waiter re-checks its own condition (no lost wake-ups)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._event.wait()


class LogWatcher(logging.Handler):
    """Collects a logger's messages and wakes waiters on each: wait on what the code reports."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[str] = []
        self.changes = Changes()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())
        self.changes.notify()

    def __enter__(self) -> LogWatcher:
        self.logger.addHandler(self)
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float = 5) -> None:
        await self.changes.until(lambda: predicate(self.records), timeout)


class Upstream:
    """A real aiohttp SSE backend whose events and failures the test drives.

    Every connection is recorded with its request headers; `publish()` writes
    to every open stream of a topic; `stop()`/`start()` restart it on the same
    port, which is how tests take an upstream away mid-stream.
    """

    def __init__(self) -> None:
        self.connections: list[web.Request] = []
        self.open: dict[str, set[web.StreamResponse]] = {}
        self.history: dict[str, list[Event]] = {}
        self.changes = Changes()
        self.status = 200
        self.content_type = "text/event-stream"
        # False: a backend that ignores Last-Event-ID (most tutorial ones do).
        self.resumes = True
        # Headers on a refusal (status other than 200), e.g. Retry-After.
        self.refusal_headers: dict[str, str] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._streams: set[asyncio.Future[None]] = set()

    def url(self, path: str = "/stream/{topic}") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream/{topic}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            server = site._server
            assert isinstance(server, asyncio.base_events.Server) or hasattr(server, "sockets")
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Drop every stream abruptly and stop listening."""
        for streams in self.open.values():
            for resp in streams:
                transport = resp._req.transport if resp._req else None
                if transport is not None:
                    transport.abort()
        for fut in self._streams:
            if not fut.done():
                fut.set_result(None)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        topic = request.match_info["topic"]
        self.connections.append(request)
        self.changes.notify()
        if self.status != 200 or self.content_type != "text/event-stream":
            return web.Response(
                status=self.status,
                text="nope",
                content_type=self.content_type,
                headers=self.refusal_headers,
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": hello\n\n")
        # Like a real backend: resume after Last-Event-ID from this topic's history.
        last_id = request.headers.get("Last-Event-ID")
        history = self.history.get(topic, [])
        ids = [e.id for e in history]
        if self.resumes and last_id in ids:
            missed = history[ids.index(last_id) + 1 :]
            if missed:
                await resp.write(encode_many(missed))
        self.open.setdefault(topic, set()).add(resp)
        self.changes.notify()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._streams.add(done)
        try:
            await done
        finally:
            self.open[topic].discard(resp)
            self._streams.discard(done)
            self.changes.notify()
        return resp

    def subscribers(self, topic: str) -> int:
        return len(self.open.get(topic, ()))

    async def wait_connections(self, count: int, timeout: float = 5) -> None:
        await self.changes.until(lambda: len(self.connections) >= count, timeout)

    async def wait_open(self, topic: str, count: int = 1, timeout: float = 5) -> None:
        await self.changes.until(lambda: self.subscribers(topic) >= count, timeout)

    async def wait_closed(self, topic: str, timeout: float = 5) -> None:
        await self.changes.until(lambda: self.subscribers(topic) == 0, timeout)

    async def send(self, topic: str, data: bytes) -> None:
        for resp in list(self.open.get(topic, ())):
            # A reader going away: its handler removes it.
            with contextlib.suppress(ConnectionResetError):
                await resp.write(data)

    async def publish(self, topic: str, *events: Event) -> None:
        """Record in the topic's history (for resume) and write to every open stream."""
        self.history.setdefault(topic, []).extend(events)
        await self.send(topic, encode_many(events))


@dataclass
class Client:
    """An SSE client over a real socket: raw bytes kept, events parsed as they arrive."""

    response: aiohttp.ClientResponse
    # Browsers bound neither lines nor events: nor does a test client.
    parser: Parser = field(
        default_factory=lambda: Parser(max_line_bytes=1 << 26, max_event_bytes=1 << 26)
    )
    raw: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    ended: bool = False
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for chunk in self.response.content.iter_any():
                self.raw += chunk
                self.events.extend(self.parser.feed(chunk))
                self.changes.notify()
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.ended = True
            self.changes.notify()

    async def wait_for(self, predicate: Callable[[Client], bool], timeout: float = 5) -> None:
        def ready() -> bool:
            if predicate(self):
                return True
            if self.ended:
                raise AssertionError(f"stream ended early; got {len(self.events)} events")
            return False

        await self.changes.until(ready, timeout)

    async def wait_events(self, count: int, timeout: float = 5) -> list[Event]:
        await self.wait_for(lambda c: len(c.events) >= count, timeout)
        return self.events

    async def wait_end(self, timeout: float = 5) -> None:
        await self.changes.until(lambda: self.ended, timeout)

    def close(self) -> None:
        self.response.close()
        if self.task is not None:
            self.task.cancel()


async def connect(session: aiohttp.ClientSession, url: str, **kwargs: object) -> Client:
    response = await session.get(url, **kwargs)  # type: ignore[arg-type]
    assert response.status == 200, (response.status, await response.text())
    client = Client(response)
    client.task = asyncio.create_task(client._read())
    return client


def events(topic: str, first: int, count: int, size: int = 0) -> list[Event]:
    pad = "x" * size
    return [Event(data=f"{topic} {i} {pad}", id=str(i)) for i in range(first, first + count)]


async def raw_request(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send bytes exactly as given (no client normalization) and read the reply head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


class FakeClock:
    """A virtual clock: `advance()` runs due timers and wakes sleepers; no wall-clock waits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, seconds: float, callback: Callable[[], None]) -> _FakeTimer:
        timer = _FakeTimer(callback)
        heapq.heappush(self._timers, (self.time + seconds, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self.call_later(seconds, wake)
        await fut

    def advance(self, seconds: float) -> None:
        end = self.time + seconds
        while self._timers and self._timers[0][0] <= end:
            when, _, timer = heapq.heappop(self._timers)
            self.time = max(self.time, when)
            if not timer.cancelled:
                timer.callback()
        self.time = end


@dataclass
class _FakeTimer:
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Publisher:
    """Publishes `count` numbered events to a topic, one every `interval` seconds (bounded)."""

    def __init__(self, upstream: Upstream, topic: str, count: int, interval: float = 0.005) -> None:
        self.upstream, self.topic, self.count, self.interval = upstream, topic, count, interval
        self.sent = 0
        self.changes = Changes()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run())
        return self

    @property
    def task(self) -> asyncio.Task[None]:
        """The running publisher, to await its end; `start()` first."""
        assert self._task is not None, "Publisher.start() was not called"
        return self._task

    async def _run(self) -> None:
        for i in range(1, self.count + 1):
            await self.upstream.publish(self.topic, *events(self.topic, i, 1))
            self.sent = i
            self.changes.notify()
            await asyncio.sleep(self.interval)  # pacing the load, not synchronising

    async def wait_sent(self, count: int, timeout: float = 10) -> None:
        await self.changes.until(lambda: self.sent >= count, timeout)


class ResumingClient:
    """Reconnects like EventSource: with Last-Event-ID, after a short pause, until told to stop."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.parser = Parser()
        self.events: list[Event] = []
        self.connects = 0
        self.changes = Changes()
        self.current: aiohttp.ClientResponse | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for _ in range(200):  # bounded reconnects
            headers = {}
            if self.parser.last_event_id:
                headers["Last-Event-ID"] = self.parser.last_event_id
            try:
                async with self.session.get(self.url, headers=headers) as resp:
                    if resp.status == 200:
                        self.connects += 1
                        self.current = resp
                        self.changes.notify()
                        async for chunk in resp.content.iter_any():
                            self.events.extend(self.parser.feed(chunk))
                            self.changes.notify()
            except (aiohttp.ClientError, ConnectionError):
                pass
            self.parser.close()
            await asyncio.sleep(0.02)  # EventSource's reconnection delay, shortened

    def drop(self) -> None:
        """Cut the current connection, as a flaky network would."""
        if self.current is not None:
            self.current.close()

    async def wait_events(self, count: int, timeout: float = 10) -> None:
        await self.changes.until(lambda: len(self.events) >= count, timeout)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class ProcessLog:
    """Reads a child process's output line by line; waiters are woken on each line."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self.changes = Changes()
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self.changes.notify()

    async def until(self, text: str, timeout: float = 10) -> None:
        await self.changes.until(lambda: any(text in line for line in self.lines), timeout)


# --- hub doubles ---------------------------------------------------------------------


class FakeSubscriber:
    def __init__(self, framing=lambda raw: raw, accept: bool = True) -> None:  # type: ignore[no-untyped-def]
        self.framing = framing
        self.topics: list[Topic] = []
        self.received: list[bytes] = []
        self.accept = accept
        self.outcome: str | None = None
        self.changes = Changes()

    def send(self, data: bytes) -> bool:
        if not self.accept or self.outcome:
            return False
        self.received.append(data)
        self.changes.notify()
        return True

    def replay(self, data: bytes, events: int) -> bool:
        return self.send(data)

    def close(self, outcome: str) -> None:
        self.outcome = self.outcome or outcome
        self.changes.notify()


class ScriptedUpstreams:
    """Records each opened topic's sink and runs until cancelled; catch-ups are scripted."""

    def __init__(self) -> None:
        self.sinks: dict[str, UpstreamSink] = {}
        self.opened: list[str] = []
        self.cancelled: list[str] = []
        self.crash: set[str] = set()
        self.give_up: set[str] = set()
        # Catch-ups: the test feeds each through its sink; `catchup_end` ends them.
        self.catchups: list[tuple[str, UpstreamSink]] = []
        self.catchup_end: asyncio.Event = asyncio.Event()
        self.changes = Changes()

    async def stream(self, target: Target, sink: UpstreamSink) -> None:
        self.opened.append(target.topic_key)
        self.sinks[target.topic_key] = sink
        self.changes.notify()
        if target.topic_key in self.crash:
            raise RuntimeError("boom")
        if target.topic_key in self.give_up:
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(target.topic_key)
            self.changes.notify()
            raise

    async def catch_up(self, target: Target, sink: UpstreamSink, last_event_id: str) -> None:
        self.catchups.append((last_event_id, sink))
        self.changes.notify()
        await self.catchup_end.wait()

    async def wait_catchups(self, count: int = 1) -> None:
        await self.changes.until(lambda: len(self.catchups) >= count)

    async def wait_opened(self, count: int = 1) -> None:
        await self.changes.until(lambda: len(self.opened) >= count)

    async def wait_cancelled(self, count: int = 1) -> None:
        await self.changes.until(lambda: len(self.cancelled) >= count)


def gateway_env(extra_env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a `python -m gateway` child: ours without SSE_GATEWAY_*, plus test
    settings; a None value in `extra_env` removes the setting (e.g. to keep a default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["SSE_GATEWAY_SERVER_DRAIN_SECONDS"] = "0.2"  # tests that time the drain set their own
    env["SSE_GATEWAY_METRICS_LISTEN"] = ""  # on the main port unless a test wants the listener
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@asynccontextmanager
async def gateway_process(
    args: Sequence[str], extra_env: Mapping[str, str | None] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, ProcessLog]]:
    """`python -m gateway` as a child, ready once it logs that it listens; killed if left over."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=gateway_env(extra_env),
    )
    assert proc.stdout is not None
    log = ProcessLog(proc.stdout)
    try:
        await log.until("listening on", 15)
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await log.task


async def gateway_exit(
    args: Sequence[str], extra_env: Mapping[str, str | None] | None = None, timeout: float = 20
) -> tuple[int, list[str]]:
    """`python -m gateway` expected to stop by itself: its exit status and its stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=gateway_env(extra_env),
    )
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace").splitlines()


# Below Linux's default ephemeral range (32768-60999): a port picked here cannot be taken, between
# the pick and the child's bind, by the source port of some outgoing connection (a busy test or
# benchmark opens thousands), which a port the kernel hands out for bind(0) can.
_LISTEN_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port nothing listens on now, for a child process to bind."""
    rng = random.Random()
    for _ in range(100):
        port = rng.choice(_LISTEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32767")


async def start_runner(runner: web.AppRunner) -> int:
    """Set `runner` up on a free loopback port; the port. The caller cleans it up."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """A throwaway server (a backend, a JWKS) on a free loopback port."""
    runner = web.AppRunner(app)
    return runner, await start_runner(runner)


async def request_status(port: int, request: bytes, local: str = "127.0.0.1") -> bytes:
    """One request on its own connection from `local`; the status code of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        return head.split()[1]
    finally:
        writer.close()


class FakeTransport:
    def __init__(self) -> None:
        self.backlog = 0
        self.writes: list[bytes] = []
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def abort(self) -> None:
        self.aborted = True


def fake_downstream(
    transport: FakeTransport, clock: FakeClock, *, max_unsent_bytes: int = 1_000_000
) -> Downstream:
    """A subscriber on a transport the test controls (its backlog, whether it closed)."""
    return Downstream(
        transport,  # type: ignore[arg-type]
        lambda raw: raw,
        max_unsent_bytes=max_unsent_bytes,
        write_timeout_seconds=5,
        heartbeat_seconds=0,
        goodbye=b"",
        clock=clock,
        metrics=Metrics(CollectorRegistry()).route("r"),
    )


class EventSource:
    """A browser's EventSource over a real socket: sends Last-Event-ID on every connection
    (the first too, if given), waits the stream's `retry:` before the next one, and keeps
    trying through refused connections (a gateway being restarted), until stopped."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        last_event_id: str = "",
        *,
        retry_ms: int = 3000,
        max_attempts: int = 500,
    ) -> None:
        self.session, self.url = session, url
        self.parser = Parser(last_event_id=last_event_id)
        # The reconnection time before the stream sets one (browsers pick a few seconds).
        self.default_retry_ms = retry_ms
        self.max_attempts = max_attempts
        self.events: list[Event] = []
        self.connects = 0  # answers with 200
        self.statuses: list[int] = []  # any other answer (EventSource would stop for good)
        self.sent_ids: list[str] = []  # the Last-Event-ID of each request, "" for none
        self.changes = Changes()
        self.task = asyncio.create_task(self._run())

    @property
    def last_id(self) -> str:
        return self.parser.last_event_id

    async def _run(self) -> None:
        for _ in range(self.max_attempts):  # bounded: each attempt waits at least 10 ms
            last_id = self.parser.last_event_id
            headers = {"Last-Event-ID": last_id} if last_id else {}
            self.sent_ids.append(last_id)
            try:
                async with self.session.get(self.url, headers=headers) as resp:
                    if resp.status == 200:
                        self.connects += 1
                        self.changes.notify()
                        async for chunk in resp.content.iter_any():
                            self.events.extend(self.parser.feed(chunk))
                            self.changes.notify()
                    else:
                        self.statuses.append(resp.status)
            except (aiohttp.ClientError, ConnectionError):
                pass  # refused, reset or cut mid-stream: reconnect, as a browser does
            self.parser.close()
            self.changes.notify()
            retry_ms = self.parser.retry_ms
            delay_ms = self.default_retry_ms if retry_ms is None else retry_ms
            await asyncio.sleep(max(delay_ms, 10) / 1000)  # the reconnection time, not sync

    async def until(self, predicate: Callable[[EventSource], bool], timeout: float = 10) -> None:
        await self.changes.until(lambda: predicate(self), timeout)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class Pacer:
    """Publishes events numbered from `first` on, one every `interval` seconds, until
    stopped or `limit` events (bounded): a steady flow as load, never as synchronisation."""

    def __init__(
        self, upstream: Upstream, topic: str, first: int, interval: float, limit: int = 1000
    ) -> None:
        self.upstream, self.topic, self.interval = upstream, topic, interval
        self.next = first
        self.last = first + limit - 1
        self.changes = Changes()
        self._stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    @property
    def sent(self) -> int:
        """The id of the newest event published (first - 1 before any)."""
        return self.next - 1

    async def _run(self) -> None:
        while self.next <= self.last and not self._stopping.is_set():
            await self.upstream.publish(self.topic, *events(self.topic, self.next, 1))
            self.next += 1
            self.changes.notify()
            # Pacing the load, not synchronising; a stop ends the wait early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def wait_sent(self, count: int, timeout: float = 10) -> None:
        await self.changes.until(lambda: self.sent >= count, timeout)

    async def stop(self) -> int:
        """Stop publishing (never inside a publish, so `sent` is exact); the last id sent."""
        self._stopping.set()
        await self.task
        return self.sent

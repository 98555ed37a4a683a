"""The downstream response: SSE headers, the preamble, direct writes, heartbeats, close.

A `Downstream` is the hub's `Subscriber`, the wheel's `Beatable` and, once the
stream is established, the socket's protocol. aiohttp parses the request and
sends the headers and the preamble (through `resp.write`, which flushes them
together at once); then the connection is taken from aiohttp (`_detach`), and
every later write goes straight to the transport with bytes the hub framed
once for all subscribers: no task wakes per event, nothing waits on a slow
client, and no task, request or response object is kept per subscriber.
A client whose unsent bytes pass `max_unsent_bytes` is aborted (it
reconnects with Last-Event-ID), which bounds memory per subscriber, and so is
one whose backlog has not drained for `write_timeout_seconds`: checked at each
write, and by one timer per backed-up stream for a client nothing is written
to (see `Downstream.pause_writing`).

A stream ends when the hub closes it, when it is cut off as slow, or when the
socket reports the client gone (`connection_lost`); its bookkeeping (hub,
wheel, metrics, access log, admission) runs once, on the next loop turn.

Before any of that, the client waits (at most `upstream_connect_timeout_seconds`)
for its topic's first upstream answer, unless the topic already has one, and is
answered as `core/answer.py` says: the stream, or the upstream's 204/4xx (and
502 for a redirect or a wrong type; in direct mode 502/503/504 for a 5xx) as
the response's status, which a browser's EventSource takes as final. So a
client ends where it would talking to the upstream (README, "What reaches the
browser"). The topic is opened (held) before the wait, so what it publishes
while the head is written is delivered at the join.

The preamble is one block, `: ok` and the `retry:` hint, ended by its blank
line so a client (or a test) knows at once that it is subscribed and every
later event starts a block of its own. Browsers dispatch nothing for it;
clients that dispatch any block holding a `retry` (httpx-sse) or any block at
all (@microsoft/fetch-event-source, for heartbeats too) see one empty message,
which the README's client guide tells them to skip. The goodbye written when
the gateway ends a stream (`retry:` alone) is left unterminated: browsers
apply `retry:` as soon as they parse the line (WHATWG "event stream
interpretation"), and the end of the stream discards the open block, so no
client sees an empty message there. In direct mode the gateway sends no
`retry:` of its own unless the route sets `direct_retry`: the upstream's own
`retry:` reaches the client, as it would directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from ..config import RouteConfig
from ..core.answer import Answer
from ..core.hub import Hub
from ..core.route import Target
from ..core.topic import Framing, Topic
from ..errors import UpstreamRefused
from ..metrics import RouteMetrics
from ..sse import encode_comment, encode_retry
from ..timing import Clock, Timer
from .accesslog import AccessLog
from .heartbeat import HeartbeatWheel

log = logging.getLogger(__name__)

HEARTBEAT = encode_comment("heartbeat")
# The first line of every stream, in the preamble's block (see above).
OPENING = b": ok\n"
# asyncio's and uvloop's default write high-water mark: past it aiohttp's write_eof waits for
# the client to drain, so a stream ended with more than this queued is aborted instead.
STALLED_BYTES = 64 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    # no-transform: intermediaries must not compress or rewrite the stream.
    "Cache-Control": "no-cache, no-transform",
    # nginx (and proxies that copy it) would otherwise buffer the response.
    "X-Accel-Buffering": "no",
}


def sends_retry(route: RouteConfig) -> bool:
    """Whether the gateway writes its own `retry:` (preamble, goodbye, turn-away): always in
    shared mode, where it spreads reconnects; in direct mode only if the route asks, since
    there the client's reconnection time is the upstream's to set."""
    return bool(route.retry_ms) and (route.mode != "direct" or route.direct_retry)


def retry_line(ms: int) -> bytes:
    """A `retry:` line with no blank line after it: the caller ends the block, or the stream."""
    return encode_retry(ms).removesuffix(b"\n")


def identity(raw: bytes) -> bytes:
    return raw


def chunked(raw: bytes) -> bytes:
    """HTTP/1.1 chunked transfer coding of one piece; applied once per batch, shared."""
    return b"%x\r\n%b\r\n" % (len(raw), raw)


LAST_CHUNK = b"0\r\n\r\n"
# What a client may send once its stream has started before it is cut off (outcome "error").
MAX_CLIENT_BYTES = 64 * 1024


def _nothing() -> None:
    pass


def _current() -> bool:
    return True


class Downstream(asyncio.Protocol):
    """One subscriber's socket."""

    __slots__ = (
        "_allowance",
        "_blocked_since",
        "_clock",
        "_end",
        "_goodbye",
        "_heartbeat",
        "_limit",
        "_metrics",
        "_on_end",
        "_received",
        "_stall",
        "_transport",
        "_write_timeout",
        "framing",
        "heartbeat_seconds",
        "last_write",
        "outcome",
        "own_bytes",
        "own_events",
        "topics",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        framing: Framing,
        *,
        max_unsent_bytes: int,
        write_timeout_seconds: float,
        heartbeat_seconds: float,
        goodbye: bytes,
        clock: Clock,
        metrics: RouteMetrics,
    ) -> None:
        self._transport = transport
        self._limit = max_unsent_bytes
        self._write_timeout = write_timeout_seconds
        self._blocked_since: float | None = None
        # Armed while the transport is past its high-water mark (see `pause_writing`).
        self._stall: Timer | None = None
        # Backlog a replay may add on top of the limit, so a client is not cut off for the
        # size of what it asked to be replayed; spent as the backlog drains.
        self._allowance = 0
        # Written when the gateway ends the stream (drain, shutdown): when to come back.
        self._goodbye = framing(goodbye) if goodbye else b""
        self._clock = clock
        self._metrics = metrics
        self._heartbeat = framing(HEARTBEAT)
        # How the response ends cleanly: the last chunk, or (unframed) just the close.
        self._end = LAST_CHUNK if framing is chunked else b""
        self._on_end: Callable[[], None] = _nothing
        self._received = 0
        self.framing = framing
        self.heartbeat_seconds = heartbeat_seconds
        self.topics: list[Topic] = []
        self.outcome: str | None = None
        self.last_write = clock.now()
        # What this subscriber was written besides the topic's live batches (the topic counts
        # those once per batch): replays, gap notices, heartbeats, the retry hint.
        self.own_events = 0
        self.own_bytes = 0

    def send(self, data: bytes) -> bool:
        if self.outcome is not None:
            return False
        transport = self._transport
        if transport.is_closing():
            self.close("gone")
            return False
        # The backlog is judged before this write, so a healthy client is never cut off for
        # the size of one batch; memory per subscriber stays under the limit plus one batch.
        backlog = transport.get_write_buffer_size()
        if backlog:
            if backlog > self._limit + self._allowance or self._blocked_too_long():
                self.close("slow")
                return False
        elif self._blocked_since is not None or self._allowance:
            # Drained: the write clock starts over and a replay's allowance is spent. Only
            # when there is something to reset: this runs per subscriber per batch.
            self._blocked_since = None
            self._allowance = 0
        transport.write(data)
        return True

    def replay(self, data: bytes, events: int) -> bool:
        if not self.send(data):
            return False
        self._allowance = len(data)
        self._metrics.bytes_written.inc(len(data))
        self.own_events += events
        self.own_bytes += len(data)
        return True

    def _blocked_too_long(self) -> bool:
        """True once the backlog has not drained to zero for `write_timeout_seconds`."""
        now = self._clock.now()
        if self._blocked_since is None:
            self._blocked_since = now
            return False
        return now - self._blocked_since > self._write_timeout

    def heartbeat(self) -> bool:
        if not self.send(self._heartbeat):
            return False
        self.last_write = self._clock.now()
        self._metrics.heartbeats.inc()
        self._metrics.bytes_written.inc(len(self._heartbeat))
        self.own_bytes += len(self._heartbeat)
        return True

    def last_activity(self) -> float:
        last = self.last_write
        for topic in self.topics:
            if topic.last_publish > last:
                last = topic.last_publish
        return last

    def close(self, outcome: str) -> None:
        """End the stream (idempotent); its bookkeeping runs on the next loop turn.

        Deferred because callers are iterating: a topic over its subscribers, the wheel over a
        slot.
        """
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        transport = self._transport
        if outcome == "slow" or transport.get_write_buffer_size() > STALLED_BYTES:
            # Drop what is queued: keeping it would keep the memory the limit exists to bound,
            # and a clean end would wait on a client that is not reading.
            transport.abort()
        elif not transport.is_closing():
            if outcome in ("shutdown", "reload", "auth") and self._goodbye:
                transport.write(self._goodbye)
                self.own_bytes += len(self._goodbye)
            if self._end:
                transport.write(self._end)
            # Sends what is queued, then the FIN.
            transport.close()
        # The callback is looked up when it runs: a stream can be closed while it subscribes
        # (its replay found the socket backed up), before its end callback is set.
        asyncio.get_running_loop().call_soon(self._ended)

    def _ended(self) -> None:
        self._on_end()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Run `callback` once, after the stream has ended."""
        self._on_end = callback

    # The socket's protocol once detached from aiohttp (see `_detach`).

    def pause_writing(self) -> None:
        """The transport's backlog passed its high-water mark: cut the client off as slow
        unless it drains (`resume_writing`) within `write_timeout_seconds`.

        `send` judges the backlog only when something is written, so a client that stops
        reading after a large replay on a quiet topic would otherwise keep it queued until
        the next event or heartbeat (30 s became ~64 s). The transport's flow control says
        when a backlog forms and when it is gone, so this costs one timer per backed-up
        stream, armed and cancelled only when the mark is crossed, and nothing per event on
        the fan-out path (`send` is unchanged). The heartbeat wheel was the other candidate:
        it visits a subscriber only when its heartbeat falls due, which is as late as the
        next heartbeat, and visiting every subscriber at write-timeout granularity would
        cost a check per subscriber per tick for the few that are backed up. A backlog
        under the mark (64 KiB) is still judged at the next write, as before.
        """
        if self.outcome is None and self._stall is None:
            self._stall = self._clock.call_later(self._write_timeout, self._stalled)

    def resume_writing(self) -> None:
        # Drained below the low-water mark (uvloop: 16 bytes; asyncio: 16 KiB).
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        self.close("slow")

    def data_received(self, data: bytes) -> None:
        # An SSE client has nothing more to say: what it sends (a pipelined request, say) is
        # dropped, so it costs no memory, and a client that keeps talking is cut off.
        self._received += len(data)
        if self._received > MAX_CLIENT_BYTES:
            self.close("error")

    def eof_received(self) -> bool:
        return False  # the client closed its side: close ours, which ends the stream

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close("gone")


@dataclass(frozen=True, slots=True)
class Services:
    """What every stream of an app shares: the hub, the heartbeat wheel, the access log."""

    hub: Hub
    wheel: HeartbeatWheel
    access: AccessLog


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the door let through: what to stream, to whom, with which extra headers.

    `release` is called once when the stream ends, however it ends (an admission
    slot, say): an established stream outlives its handler. `still_current` turns
    false when a reload replaced the routes this request was decided under.
    """

    target: Target
    headers: Mapping[str, str]
    last_event_id: str | None
    client: str
    # Who the client is for per-client limits (`policy.client_key`): an IPv6 client's /64.
    client_key: str = ""
    expires_at: float | None = None
    still_current: Callable[[], bool] = _current
    release: Callable[[], None] = _nothing


@dataclass(frozen=True, slots=True)
class _Opened:
    """A response whose head and preamble reached the socket."""

    response: web.StreamResponse
    transport: asyncio.Transport
    preamble: bytes
    goodbye: bytes


async def turn_away(
    request: web.Request, target: Target, extra_headers: Mapping[str, str]
) -> web.StreamResponse:
    """While draining: a valid, empty stream with a retry hint, then the end.

    Not a 503: EventSource treats any status but 200 as final and never
    reconnects, and the point of a drain is that clients do, elsewhere.
    """
    route = target.route
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS | dict(extra_headers))
    resp.force_close()
    retry_ms = random.randint(route.retry_ms, route.retry_max_ms) if route.retry_ms else 1000
    # Direct mode: the client keeps the upstream's reconnection time unless the route asks.
    hint = retry_line(retry_ms) if route.mode != "direct" or sends_retry(route) else b""
    try:
        await resp.prepare(request)
        await resp.write(OPENING + hint)
        await resp.write_eof()
    except ConnectionError:
        raise _client_gone() from None
    return resp


async def serve(request: web.Request, admitted: Admitted, services: Services) -> web.StreamResponse:
    """Stream `admitted.target`'s topic to this request until the client, the hub or shutdown
    ends it.

    Three steps: the topic is opened (held) and its upstream's first answer awaited,
    which may refuse the request with the upstream's status; `_open` sends the
    response head and the preamble through aiohttp (it awaits, and the client may
    leave at any point of it); `_join` subscribes and detaches with no await, so the
    stream starts at an event boundary. A client gone before its stream started
    ends the handler as aiohttp ends it for a client that left (cancelled): nothing
    is logged and nothing went wrong.
    """
    hub = services.hub
    owned = False  # True once `release` belongs to the stream's end
    held: Topic | None = None  # a topic this request holds and has not joined
    try:
        target = admitted.target
        route = target.route
        if hub.is_closing():
            return await turn_away(request, target, admitted.headers)
        if request.transport is None or request.transport.is_closing():
            raise _client_gone()  # gone already: open nothing for it
        metrics = hub.metrics.route(route.name)
        if not admitted.still_current():
            # A reload replaced the routes this request was decided under (during its auth
            # check): open nothing of the old route; the client comes back under the new one.
            return await _open_and_end(request, target, admitted.headers, metrics)
        # Before the response starts, so a refusal is a clean 503/429.
        held = hub.open(target, client=admitted.client_key or admitted.client)
        since = held.ring.next_seq
        answer = await _first_answer(held, route.upstream_connect_timeout_seconds)
        if hub.is_closing():
            return await turn_away(request, target, admitted.headers)
        refusal = _refusal(answer, route, admitted.headers)
        if refusal is not None:
            raise refusal
        opened = await _open(request, target, admitted.headers, metrics)
        if opened is None:
            raise _client_gone()
        if hub.is_closing() or not admitted.still_current():
            # Shutdown began, or a reload changed the routes, while the preamble was written:
            # end now; the client comes back under whatever serves then.
            return opened.response
        if route.mode == "direct" and (answer is None or answer.kind == "unreachable"):
            # No answer from its upstream: the client reconnects on its own schedule, as it
            # would after a network error talking to the upstream directly.
            return await _end(opened)
        topic, held = held, None  # `_join` hands the hold to the hub
        owned = _join(request, opened, admitted, services, metrics, topic, since)
    finally:
        if held is not None:
            hub.let_go(held)
        if not owned:
            admitted.release()
    # aiohttp now holds nothing of this connection and has cancelled this handler, as it does
    # when a client leaves: end it the same way, so aiohttp writes and logs nothing.
    raise asyncio.CancelledError


async def _open_and_end(
    request: web.Request, target: Target, headers: Mapping[str, str], metrics: RouteMetrics
) -> web.StreamResponse:
    """A stream that ends after its preamble: the client reconnects."""
    opened = await _open(request, target, headers, metrics)
    if opened is None:
        raise _client_gone()
    return await _end(opened)


async def _end(opened: _Opened) -> web.StreamResponse:
    with contextlib.suppress(ConnectionError):
        await opened.response.write_eof()
    return opened.response


async def _first_answer(topic: Topic, timeout_seconds: float) -> Answer | None:
    """The topic's first upstream answer, waited for at most `timeout_seconds`; None if
    none came (the topic keeps trying; a shared client streams meanwhile)."""
    if topic.answer is not None:
        return topic.answer
    try:
        async with asyncio.timeout(timeout_seconds):
            return await topic.wait_answer()
    except TimeoutError:
        return None


def _refusal(
    answer: Answer | None, route: RouteConfig, headers: Mapping[str, str]
) -> UpstreamRefused | None:
    """The upstream's answer as this client's status, when it is not a stream to open.

    Final answers pass in both modes. A 5xx passes in direct mode only: a browser talking
    to the upstream would stop there, while a shared topic hides it and retries.
    """
    if answer is None or not (answer.final or (answer.kind == "error" and route.mode == "direct")):
        return None
    # The CORS headers too: without them a cross-origin EventSource sees a network error and
    # reconnects, where the status alone makes it stop.
    passed = dict(headers)
    if answer.retry_after is not None:
        passed["Retry-After"] = answer.retry_after
    return UpstreamRefused(answer.status, answer.reason, headers=passed)


def _client_gone() -> asyncio.CancelledError:
    """How a handler whose client left ends: aiohttp's own path for it, silent.

    A 500 (what any other exception becomes) would log a traceback for a client
    that merely hung up, as clients do in a reconnect storm.
    """
    return asyncio.CancelledError()


async def _open(
    request: web.Request, target: Target, headers: Mapping[str, str], metrics: RouteMetrics
) -> _Opened | None:
    """Send the response head and the preamble; None if the client left at any point.

    The client may leave before this starts, while aiohttp prepares the response,
    during the preamble's write, or just after it: a write to a closing transport
    raises (how soon depends on the Python: from 3.12 aiohttp starts handlers
    eagerly, before the loop has seen the client's reset), so every step is checked.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return None
    route = target.route
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS | dict(headers))
    # One stream per connection: a closed stream means the connection is done.
    resp.force_close()
    if request.version >= (1, 1):
        # Explicit, so the framing below is our decision, not an inference.
        resp.enable_chunked_encoding()
    # Drawn per connection, so clients cut off together come back spread over the range.
    retry = (
        retry_line(random.randint(route.retry_ms, route.retry_max_ms))
        if sends_retry(route)
        else b""
    )
    preamble = OPENING + retry + b"\n"
    try:
        await resp.prepare(request)
        # Through aiohttp so the buffered headers and the preamble leave in one write, now.
        await resp.write(preamble)
    except ConnectionError:
        return None
    metrics.bytes_written.inc(len(preamble))
    if request.protocol.transport is None or transport.is_closing():
        return None  # gone while the preamble was written
    return _Opened(resp, transport, preamble, retry)


def _join(
    request: web.Request,
    opened: _Opened,
    admitted: Admitted,
    services: Services,
    metrics: RouteMetrics,
    topic: Topic,
    since: int,
) -> bool:
    """Subscribe the opened stream to the topic it holds, after what the topic published
    from ring position `since` on, and take its socket from aiohttp. No await: the stream
    starts at an event boundary, and the socket cannot change hands half way."""
    hub, target = services.hub, admitted.target
    route = target.route
    downstream = Downstream(
        opened.transport,
        chunked if opened.response.chunked else identity,
        max_unsent_bytes=route.max_unsent_bytes,
        write_timeout_seconds=route.write_timeout_seconds,
        heartbeat_seconds=route.heartbeat_seconds,
        goodbye=opened.goodbye,
        clock=hub.clock,
        metrics=metrics,
    )
    downstream.own_bytes += len(opened.preamble)
    hub.join(topic, downstream, admitted.last_event_id, since)
    services.wheel.add(downstream)
    metrics.opened.inc()
    stream = _Stream(downstream, topic, admitted, services)
    downstream.on_end(stream.ended)
    expires_at = admitted.expires_at
    if expires_at is not None:
        # The grant ends with the client's token: close then, with a retry hint, so the
        # client comes back with a fresh token and its Last-Event-ID.
        stream.expiry = hub.clock.call_later(
            max(0.0, expires_at - hub.clock.now()), lambda: downstream.close("auth")
        )
    _detach(request, opened.transport, downstream)
    return True


def _detach(request: web.Request, transport: asyncio.Transport, downstream: Downstream) -> None:
    """Take an established stream's connection from aiohttp.

    For as long as a handler runs, aiohttp keeps its protocol and parser, the
    request, the response and two tasks per connection: about 9 KiB, most of a
    subscriber's memory. An established stream needs none of them, because the
    hub writes to the transport directly. So the socket's events go to the
    `Downstream` from now on, and aiohttp is told the connection was lost, with
    its transport reference cleared first so that it closes nothing: it drops
    the connection from its table (shutdown no longer waits for it; the hub ends
    streams) and cancels the handler, exactly its path for a client that left.
    """
    handler = request.protocol
    transport.set_protocol(downstream)
    # A replay written while subscribing paused aiohttp's protocol, not ours: the transport
    # will tell us only of the resume, so start the write-timeout timer here.
    _, high_water = transport.get_write_buffer_limits()
    if transport.get_write_buffer_size() > high_water:
        downstream.pause_writing()
    handler.transport = None
    handler.connection_lost(None)
    if not transport.is_reading():
        transport.resume_reading()  # so a client's close is seen


class _Stream:
    """What a stream's end must settle: the hub, the wheel, metrics, the log line, admission."""

    __slots__ = ("admitted", "downstream", "expiry", "services", "started", "topic")

    def __init__(
        self, downstream: Downstream, topic: Topic, admitted: Admitted, services: Services
    ) -> None:
        self.downstream = downstream
        self.topic = topic
        self.admitted = admitted
        self.services = services
        self.started = services.hub.clock.now()
        self.expiry: Timer | None = None

    def ended(self) -> None:
        downstream, hub = self.downstream, self.services.hub
        if self.expiry is not None:
            self.expiry.cancel()
        self.services.wheel.discard(downstream)
        live_events, live_bytes = hub.unsubscribe(self.topic, downstream)
        outcome = downstream.outcome or "gone"
        seconds = hub.clock.now() - self.started
        target = self.admitted.target
        route = target.route
        metrics = hub.metrics.route(route.name)
        metrics.closed[outcome].inc()
        metrics.subscription_seconds.observe(seconds)
        self.admitted.release()
        self.services.access.write(
            "stream",
            {
                "route": route.name,
                "topic": target.upstream_url,
                "client": self.admitted.client,
                "status": 200,
                "seconds": round(seconds, 3),
                "events": live_events + downstream.own_events,
                "bytes": live_bytes + downstream.own_bytes,
                "outcome": outcome,
            },
        )

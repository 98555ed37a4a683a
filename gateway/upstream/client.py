"""The upstream side: one long-lived GET per topic, parsed as bytes arrive.

`UpstreamClient` is how the hub reaches upstreams. For each topic it connects,
checks the response (2xx and `text/event-stream`, else a logged reason), reports
what the answer means to a client (`core/answer.py`) before any event, feeds
every chunk to a fresh `sse.Parser` as soon as it arrives and publishes the
events of that read as one batch. When the stream ends or fails it
reconnects after a jittered exponential backoff, never sooner than the
upstream's `retry:` but never later than the route's `reconnect_max_seconds` (an
upstream cannot park a topic), and resumes with `Last-Event-ID`. The first
failure since events last flowed is a warning, the outage's further attempts
are debug lines, and every wait is observed in a histogram. Failures stay inside
the topic's own task: nothing here raises into the hub except cancellation.
A final answer (204, 4xx, a redirect, a wrong type) is not retried: the runner
returns and the topic ends. A direct topic's upstream `retry:` is reported to
it, so its client gets the upstream's own reconnection time.
`catch_up` is the same request made once, for the events after a client's
Last-Event-ID; it ends when the hub has what it needs or the stream ends.

Choices that matter for streams:
- `ClientTimeout(total=None)`: aiohttp's default 5-minute total would cut
  every healthy stream; an idle timeout (`sock_read`) catches a stalled
  upstream instead.
- `Accept-Encoding: identity`: a compressing upstream buffers to fill
  compression blocks, which delays events.
- No redirects: the upstream's location comes from configuration only.
- `upstream_connect_timeout_seconds` bounds the wait for the response head, not
  only the TCP connect: an upstream that accepts and never answers holds its
  clients no longer than that (aiohttp's `sock_read` would wait the idle timeout).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re

import aiohttp

from ..core.answer import Answer, of_response, unreachable
from ..core.route import Target
from ..core.topic import TopicSink, UpstreamSink
from ..metrics import Metrics, RouteMetrics
from ..sse import Parser
from ..timing import Backoff, Clock
from ..tls import client_context

log = logging.getLogger(__name__)

# Characters an HTTP field value may not hold (RFC 9110 5.5); an upstream id containing one
# cannot be sent back as Last-Event-ID.
_NOT_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

_BASE_HEADERS = {
    "Accept": "text/event-stream",
    "Cache-Control": "no-cache",
    "Accept-Encoding": "identity",
}


class _Failed(Exception):
    """One attempt ended; `reason` is a metrics label, `detail` goes to the log, `answer` is
    what the attempt's head meant (None once the stream had started)."""

    def __init__(self, reason: str, detail: str, answer: Answer | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.answer = answer


class UpstreamClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()

    async def stream(self, target: Target, sink: TopicSink) -> None:
        route = target.route
        metrics = self._metrics.route(route.name)
        backoff = Backoff(
            route.reconnect_initial_seconds, route.reconnect_max_seconds, rng=self._rng
        )
        headers = _request_headers(target)
        headers.update(target.client_headers)  # direct mode: this client's own headers
        timeout = _timeout(target)
        # One parser for the topic's whole life: across reconnects it keeps the committed
        # last event id (an id inside an event cut off mid-way is not committed) and `retry`.
        parser = Parser(
            max_line_bytes=route.line_limit,
            max_event_bytes=route.max_event_bytes,
            # Direct mode: the client's own Last-Event-ID is where its stream resumes.
            last_event_id=dict(target.client_headers).get("Last-Event-ID", ""),
        )
        attempts = 0
        while True:
            sink.set_state("connecting")
            if attempts:
                metrics.upstream_reconnects.inc()
            attempts += 1
            resume_id = parser.last_event_id
            if resume_id and not _NOT_FIELD_VALUE.search(resume_id):
                headers["Last-Event-ID"] = resume_id
            else:
                if resume_id:
                    log.warning(
                        "upstream %s: last event id %r cannot be sent as a header; "
                        "reconnecting without Last-Event-ID",
                        target.upstream_url,
                        resume_id[:64],
                    )
                headers.pop("Last-Event-ID", None)
            answer = None
            try:
                await self._stream(
                    target, sink, metrics, parser, headers, timeout, backoff, topic=sink
                )
                reason, detail = "eof", "upstream closed the stream"
            except _Failed as failure:
                reason, detail, answer = failure.reason, failure.detail, failure.answer
            finally:
                sink.set_state("backoff")
                parser.close()
            metrics.upstream_failures[reason].inc()
            if answer is not None:
                sink.answered(answer)
                if answer.final:
                    # The upstream's own "stop": retrying would turn it into a loop, and a
                    # client talking to it directly would stop too. The topic ends.
                    log.warning(
                        "upstream %s for route %s: %s; not retried, its topic ends",
                        target.upstream_url,
                        route.name,
                        detail,
                    )
                    return
            if route.mode == "direct":
                # One request per client: when it ends the client's stream ends, and the
                # client reconnects (with its Last-Event-ID) on its own schedule.
                log.info("direct upstream %s ended: %s", target.upstream_url, detail)
                return
            retry_seconds, capped = _retry_floor(parser.retry_ms, route.reconnect_max_seconds)
            # An episode starts with the first failure since events last flowed (that is when
            # the backoff resets): warn once there, not on every attempt of a long outage.
            first = backoff.attempt == 0
            delay = backoff.next_delay(retry_seconds)
            metrics.upstream_backoff_seconds.observe(delay)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "upstream %s for route %s: %s; %s, reconnecting in %.2fs%s",
                target.upstream_url,
                route.name,
                detail,
                "backing off" if first else "still backing off",
                delay,
                " (its retry: is over reconnect_max_seconds, capped)" if capped else "",
            )
            await self._clock.sleep(delay)

    async def catch_up(self, target: Target, sink: UpstreamSink, last_event_id: str) -> None:
        route = target.route
        parser = Parser(
            max_line_bytes=route.line_limit,
            max_event_bytes=route.max_event_bytes,
            last_event_id=last_event_id,
        )
        headers = _request_headers(target)
        if not _NOT_FIELD_VALUE.search(last_event_id):
            headers["Last-Event-ID"] = last_event_id
        metrics = self._metrics.route(route.name)
        try:
            await self._stream(target, sink, metrics, parser, headers, _timeout(target), None)
        except _Failed as failure:
            raise RuntimeError(failure.detail) from None

    async def _stream(
        self,
        target: Target,
        sink: UpstreamSink,
        metrics: RouteMetrics,
        parser: Parser,
        headers: dict[str, str],
        client_timeout: aiohttp.ClientTimeout,
        backoff: Backoff | None,
        topic: TopicSink | None = None,
    ) -> None:
        """One request: check it, then publish each read's events until the stream ends.

        `topic` is the sink when this is a topic's own stream (not a catch-up): it is told the
        head's meaning and, on a direct route, the upstream's `retry:`.
        """
        connected = False
        try:
            async with asyncio.timeout(target.route.upstream_connect_timeout_seconds):
                resp = await self._session.get(
                    target.upstream_url,
                    headers=headers,
                    timeout=client_timeout,
                    allow_redirects=False,
                    # Cached per route's files; a file OpenSSL rejects fails this attempt
                    # (ValueError).
                    ssl=client_context(target.route),
                )
            async with resp:
                answer = of_response(
                    resp.status, resp.content_type, resp.headers.get("Retry-After")
                )
                if answer.kind != "stream":
                    bad_type = 200 <= resp.status < 300 and resp.status != 204
                    bad_type = bad_type and resp.content_type.lower() != "text/event-stream"
                    raise _Failed(
                        "content_type" if bad_type else "status",
                        f"content type {resp.content_type!r}"
                        if bad_type
                        else f"HTTP status {resp.status}",
                        answer,
                    )
                connected = True
                if topic is not None:
                    topic.answered(answer)
                sink.set_state("connected")
                if backoff is not None:  # the topic's own stream, not a catch-up
                    metrics.upstream_connects.inc()
                    log.info(
                        "upstream %s connected for route %s",
                        target.upstream_url,
                        target.route.name,
                    )
                oversize = parser.oversize_events  # cumulative over the topic's life
                # Direct mode: the client is the upstream's own, so its `retry:` is the client's.
                forward_retry = topic if target.route.mode == "direct" else None
                retry_ms = parser.retry_ms
                async for chunk in resp.content.iter_any():
                    events = parser.feed(chunk)
                    if forward_retry is not None and parser.retry_ms != retry_ms:
                        retry_ms = parser.retry_ms
                        if retry_ms is not None:
                            forward_retry.retry(retry_ms)
                    if parser.oversize_events != oversize:
                        sink.dropped("oversize", parser.oversize_events - oversize)
                        oversize = parser.oversize_events
                    if events:
                        sink.publish(events)
                        if backoff is not None and backoff.attempt:
                            log.info(
                                "upstream %s for route %s delivers again after %d failed attempts",
                                target.upstream_url,
                                target.route.name,
                                backoff.attempt,
                            )
                            backoff.reset()
        except TimeoutError:
            if connected:
                raise _Failed("timeout", "no bytes within the idle timeout") from None
            raise _Failed("connect", "no response head in time", unreachable(True)) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp refusing a request it cannot send (a bad header value);
            # it must stay a failure of this attempt, never reach the hub.
            detail = f"{type(exc).__name__}: {exc}"
            if connected:
                raise _Failed("read", detail) from None
            raise _Failed("connect", detail, unreachable(False)) from None


def _retry_floor(retry_ms: int | None, max_seconds: float) -> tuple[float, bool]:
    """The upstream's `retry:` as a minimum wait in seconds, capped at `max_seconds`.

    The parser keeps the value exact, so it can have hundreds of digits: compared before any
    division (an int/float comparison is exact, `10**400 / 1000` raises OverflowError), the
    upstream's hint is honoured only up to the operator's maximum. Returns (seconds, capped).
    """
    if retry_ms is None:
        return 0.0, False
    if retry_ms > max_seconds * 1000:
        return max_seconds, True
    return retry_ms / 1000, False


def _request_headers(target: Target) -> dict[str, str]:
    headers = dict(_BASE_HEADERS)
    headers.update((h.name, h.value) for h in target.route.upstream_headers)
    return headers


def _timeout(target: Target) -> aiohttp.ClientTimeout:
    route = target.route
    return aiohttp.ClientTimeout(
        total=None,
        connect=route.upstream_connect_timeout_seconds,
        sock_read=route.upstream_idle_timeout_seconds or None,
    )

"""The upstream side: one long-lived GET per topic, parsed as bytes arrive.

`UpstreamClient` is how the hub reaches upstreams. For each topic it connects,
checks the response (2xx and `text/event-stream`, else a logged reason),
feeds every chunk to a fresh `sse.Parser` as soon as it arrives and publishes
the events of that read as one batch. When the stream ends or fails it
reconnects after a jittered exponential backoff, never sooner than the
upstream's `retry:` but never later than the route's `reconnect_max_seconds` (an
upstream cannot park a topic), and resumes with `Last-Event-ID`. The first
failure since events last flowed is a warning, the outage's further attempts
are debug lines, and every wait is observed in a histogram. Failures stay inside
the topic's own task: nothing here raises into the hub except cancellation.
`catch_up` is the same request made once, for the events after a client's
Last-Event-ID; it ends when the hub has what it needs or the stream ends.

Choices that matter for streams:
- `ClientTimeout(total=None)`: aiohttp's default 5-minute total would cut
  every healthy stream; an idle timeout (`sock_read`) catches a stalled
  upstream instead.
- `Accept-Encoding: identity`: a compressing upstream buffers to fill
  compression blocks, which delays events.
- No redirects: the upstream's location comes from configuration only.
"""

from __future__ import annotations

import logging
import random
import re

import aiohttp

from ..core.route import Target
from ..core.topic import UpstreamSink
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
    """One attempt ended; `reason` is a metrics label, `detail` goes to the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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

    async def stream(self, target: Target, sink: UpstreamSink) -> None:
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
            try:
                await self._stream(target, sink, metrics, parser, headers, timeout, backoff)
                reason, detail = "eof", "upstream closed the stream"
            except _Failed as failure:
                reason, detail = failure.reason, failure.detail
            finally:
                sink.set_state("backoff")
                parser.close()
            metrics.upstream_failures[reason].inc()
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
    ) -> None:
        """One request: check it, then publish each read's events until the stream ends."""
        connected = False
        try:
            async with self._session.get(
                target.upstream_url,
                headers=headers,
                timeout=client_timeout,
                allow_redirects=False,
                # Cached per route's files; a file OpenSSL rejects fails this attempt (ValueError).
                ssl=client_context(target.route),
            ) as resp:
                if not 200 <= resp.status < 300 or resp.status == 204:
                    raise _Failed("status", f"HTTP status {resp.status}")
                if resp.content_type != "text/event-stream":
                    raise _Failed("content_type", f"content type {resp.content_type!r}")
                connected = True
                sink.set_state("connected")
                if backoff is not None:  # the topic's own stream, not a catch-up
                    metrics.upstream_connects.inc()
                    log.info(
                        "upstream %s connected for route %s",
                        target.upstream_url,
                        target.route.name,
                    )
                oversize = parser.oversize_events  # cumulative over the topic's life
                async for chunk in resp.content.iter_any():
                    events = parser.feed(chunk)
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
            raise _Failed("connect", "connect timed out") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp refusing a request it cannot send (a bad header value);
            # it must stay a failure of this attempt, never reach the hub.
            reason = "read" if connected else "connect"
            raise _Failed(reason, f"{type(exc).__name__}: {exc}") from None


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

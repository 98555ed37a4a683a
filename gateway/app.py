"""The composition root: builds the hub, the upstream client and the handlers.

`make_app(config)` returns an aiohttp application that serves every configured
route, `/healthz`, `/readyz`, `/metrics` and (with the demo on) the demo page
at `/`. It is the only module that knows both HTTP and how the pieces fit;
the hub sees upstreams only through the `UpstreamFactory` it is handed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from .config import GatewayConfig
from .core.hub import Hub
from .core.route import RouteTable, Target
from .core.topic import Upstreams
from .edge import policy, stream
from .edge.accesslog import AccessLog
from .edge.auth import Authorizer
from .edge.head import RequestHead, door
from .edge.heartbeat import HeartbeatWheel
from .errors import GatewayError
from .metrics import Metrics
from .timing import Clock, MonotonicClock
from .upstream.client import UpstreamClient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lifecycle:
    """Readiness: true while the gateway takes new streams; false once draining starts."""

    ready: bool = True


@dataclass(slots=True)
class Settings:
    """What a reload replaces. The app's own state freezes at startup, so it lives here."""

    config: GatewayConfig
    routes: RouteTable
    # The longest Last-Event-ID the door takes: the largest `max_last_event_id_bytes` this
    # process has had, so a reload that lowers it cannot refuse an id sent before (what the
    # gateway sends, it accepts back); new ids follow the new limit at once.
    id_bytes: int = 0


METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
HUB = web.AppKey("hub", Hub)
WHEEL = web.AppKey("wheel", HeartbeatWheel)
SETTINGS = web.AppKey("settings", Settings)
ADMISSION = web.AppKey("admission", policy.Admission)
ACCESS = web.AppKey("access", AccessLog)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
SERVICES = web.AppKey("services", stream.Services)

_direct_ids = itertools.count(1)
_PLAIN_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Marks a request whose refusal the middleware already counted and logged.
_COUNTED = web.RequestKey("sse_gateway_counted", bool)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place a GatewayError becomes a response: status, short body, counted."""
    try:
        return await handler(request)
    except GatewayError as exc:
        request[_COUNTED] = True
        request.app[METRICS].requests_rejected.labels(exc.reason).inc()
        request.app[ACCESS].write(
            "rejected",
            {
                "method": request.method,
                # Raw (a decoded %0D%0A forges nothing) and without the query string, which
                # may carry a token.
                "path": request.raw_path.partition("?")[0][:200],
                "client": client_of(request),
                "status": exc.status,
                "reason": exc.reason,
                "message": exc.message,
            },
        )
        # A 204 has no body (RFC 9110 15.3.5): an upstream's 204 is passed on as one.
        text = None if exc.status == 204 else exc.message + "\n"
        response = web.Response(status=exc.status, text=text, headers=exc.headers)
        # A refused client gets no second request on this connection: a flood of refused
        # requests costs a connection each, not one pipelined connection for all of them.
        response.force_close()
        return response


class RejectionLog(AbstractAccessLogger):
    """Counts and logs what aiohttp refuses before any handler runs.

    Garbage instead of HTTP, a header over `max_header_bytes`, a request line
    too long: aiohttp answers 400 by itself, so the error middleware never
    sees them. (Issue 5 turns this into the full access log.)
    """

    # Set on a per-app subclass by make_runner: aiohttp builds the logger itself.
    metrics: Metrics
    access: AccessLog

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status < 400 or request.get(_COUNTED):
            return
        self.metrics.requests_rejected.labels("malformed").inc()
        fields = {"client": request.remote, "status": response.status, "reason": "malformed"}
        self.access.write("rejected", fields)


class QuietMalformed(logging.Filter):
    """Drops aiohttp's ERROR-with-traceback for a request its parser refused.

    A client controls those bytes (a control character in a header value, say), so they
    are no server error: the 400 is already counted and logged as one `malformed` line by
    `RejectionLog`. Any other error aiohttp logs passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_QUIET_MALFORMED = QuietMalformed()


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner for a gateway app, with the limits that apply before any handler runs."""
    # Idempotent: a logger holds a filter once however many runners are made.
    logging.getLogger("aiohttp.server").addFilter(_QUIET_MALFORMED)
    config = app[SETTINGS].config
    limits = config.limits
    access_log = type(
        "AppRejectionLog", (RejectionLog,), {"metrics": app[METRICS], "access": app[ACCESS]}
    )
    return web.AppRunner(
        app,
        # A stream handler must learn at once that its client left.
        handler_cancellation=True,
        shutdown_timeout=config.server.shutdown_timeout_seconds,
        # Armed when a connection opens: a client that has not sent a whole request by then
        # (a slowloris) is closed. Streams are one per connection, so no keep-alive is lost.
        keepalive_timeout=limits.header_timeout_seconds,
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
        access_log_class=access_log,
        access_log=logging.getLogger("gateway.access"),
    )


def make_app(
    config: GatewayConfig,
    *,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    upstreams: Upstreams | None = None,
) -> web.Application:
    """Wire the gateway. `metrics`, `clock` and `upstreams` are seams for tests."""
    metrics = metrics or Metrics()
    clock = clock or MonotonicClock()
    app = web.Application(middlewares=[error_middleware])
    app[METRICS] = metrics
    app[LIFECYCLE] = Lifecycle()
    app[SETTINGS] = Settings(
        config, RouteTable(config.routes), config.limits.max_last_event_id_bytes
    )
    app[ADMISSION] = policy.Admission(config.limits, clock)
    app[ACCESS] = AccessLog(config.server.access_log)
    app[WHEEL] = HeartbeatWheel(
        clock, HeartbeatWheel.tick_for([r.heartbeat_seconds for r in config.routes])
    )

    async def hub_context(app: web.Application) -> AsyncIterator[None]:
        # No connection cap here: topics are capped per route, and each holds one connection.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)
        session = aiohttp.ClientSession(connector=connector, trust_env=False)
        client = upstreams if upstreams is not None else UpstreamClient(session, metrics, clock)
        app[HUB] = Hub(client, clock, metrics, config.limits)
        app[AUTHORIZER] = Authorizer(session, clock)
        app[SERVICES] = stream.Services(app[HUB], app[WHEEL], app[ACCESS])
        for route in config.routes:
            metrics.route(route.name)  # every series exists, at 0, before its first event
        lag = asyncio.create_task(watch_loop_lag(metrics), name="loop lag")
        yield
        lag.cancel()
        await app[HUB].close()
        app[WHEEL].close()
        await session.close()

    async def on_shutdown(app: web.Application) -> None:
        # aiohttp has stopped accepting; end every stream so handlers return.
        app[LIFECYCLE].ready = False
        await app[HUB].close()

    log_cors(config)
    app.cleanup_ctx.append(hub_context)
    app.on_shutdown.append(on_shutdown)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.metrics.enabled and config.metrics.listen is None:
        app.router.add_get(config.metrics.path, metrics_handler)
    if config.demo.enabled:
        app.router.add_get("/", demo_page)
    # [\s\S]: "." would not match a decoded %0A, leaving such paths to aiohttp's bare 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", stream_handler)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="draining\n")


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_metrics_app(metrics: Metrics, path: str) -> web.Application:
    """The internal listener: metrics (and liveness) apart from the public streams."""
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get(path, metrics_handler)
    app.router.add_get("/healthz", healthz)
    return app


async def watch_loop_lag(metrics: Metrics, interval_seconds: float = 0.25) -> None:
    """Observe how late the loop wakes a timer: the delay every callback is seeing."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_seconds
        await asyncio.sleep(interval_seconds)
        metrics.loop_lag.observe(max(0.0, loop.time() - due))


async def demo_page(request: web.Request) -> web.Response:
    page = resources.files("gateway").joinpath("static/index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def stream_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    config = settings.config
    # The table this request is served under: a reload during an await below (auth) must
    # end this stream after its preamble, not let it join a topic of a route that is gone.
    routes = settings.routes
    head = head_of(request)
    entry = door(head, routes, config, settings.id_bytes)
    if entry.preflight:
        return web.Response(status=204, headers=entry.cors)
    target = entry.target
    if not app[LIFECYCLE].ready:
        return await stream.turn_away(request, target, entry.cors)
    admission = app[ADMISSION]
    client, route = entry.client, target.route
    key = policy.client_key(client)
    # Admission first: its per-client limits also shield the auth backends.
    admission.enter(key, route, forwarded=head.forwarded_untrusted(config))
    # An established stream outlives this handler: its end gives the slot back.
    release = functools.partial(admission.leave, key, route)
    last_event_id = entry.last_event_id
    try:
        # Auth still reads the aiohttp request (headers, cookies, query, path): see
        # edge/head.py for the head it would take instead.
        grant = await app[AUTHORIZER].check(head, target)
        if route.mode == "direct":
            # The client's own upstream request carries its Last-Event-ID: no replay here.
            target, last_event_id = direct_target(head, target, last_event_id, client), None
    except BaseException:
        release()
        raise
    admitted = stream.Admitted(
        target,
        entry.cors,
        last_event_id,
        client,
        client_key=key,
        expires_at=grant.expires_at,
        still_current=lambda: app[SETTINGS].routes is routes,
        release=release,
    )
    return await stream.serve(request, admitted, app[SERVICES])


def head_of(request: web.BaseRequest) -> RequestHead:
    """The HTTP/1.1 listener's request head: what the door decides on."""
    return RequestHead(
        method=request.method,
        raw_path=request.raw_path,
        query=tuple(request.query.items()),
        headers=request.headers,
        peer=request.remote,
        tls=request.secure,
        scheme=request.scheme,
        host=request.host,
    )


def client_of(request: web.Request) -> str:
    """The client's address: the peer's, or the one trusted proxies name (`trusted_proxies`)."""
    return policy.client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", []),
        request.app[SETTINGS].config.server.trusted_proxies,
    )


def direct_target(
    head: RequestHead, target: Target, last_event_id: str | None, client: str
) -> Target:
    """A private topic for one client: its upstream request carries this client's headers.

    Only the route's allow-listed `forward_headers` (config refuses hop-by-hop,
    framing and gateway-owned names there), the standard forwarding headers (set
    fresh, naming the client as the door resolved it, not as the request claimed)
    and the client's Last-Event-ID reach the upstream.
    """
    route = target.route
    headers = [
        (name, value) for name in route.forward_headers if (value := head.joined(name)) is not None
    ]
    peer, proto = client, head.scheme
    # The Host header is client input: only a plain host[:port] may be passed on, or a
    # crafted one would add its own elements to Forwarded (RFC 7239) and fool the upstream.
    host = head.host if _PLAIN_HOST.fullmatch(head.host) else None
    node = f"[{peer}]" if ":" in peer else peer  # RFC 7239 6: IPv6 in brackets
    forwarded = f'for="{node}";proto={proto}' + (f';host="{host}"' if host else "")
    headers += [("X-Forwarded-For", peer), ("X-Forwarded-Proto", proto), ("Forwarded", forwarded)]
    if host:
        headers.append(("X-Forwarded-Host", host))
    if last_event_id:
        headers.append(("Last-Event-ID", last_event_id))
    key = f"{target.topic_key} #{next(_direct_ids)}"
    return dataclasses.replace(target, topic_key=key, client_headers=tuple(headers))


async def drain(app: web.Application) -> None:
    """SIGTERM, step one: stop being ready, then end the streams in waves over the window."""
    app[LIFECYCLE].ready = False
    hub = app[HUB]
    window = app[SETTINGS].config.server.drain_seconds
    streams = sum(len(t.subscribers) for t in hub.topics.values())
    log.info("draining: /readyz answers 503; ending %d streams over %.1fs", streams, window)
    await hub.drain(window).wait()


# Settings the running process cannot change: the listeners and the aiohttp runner are built
# once at start (aiohttp copies its limits into every connection's protocol).
RESTART_ONLY = (
    ("server", "listen"),
    ("server", "workers"),
    ("server", "tls_cert_file"),
    ("server", "tls_key_file"),
    ("server", "shutdown_timeout_seconds"),
    ("limits", "max_header_bytes"),
    ("limits", "header_timeout_seconds"),
)


def apply_log_level(level: str) -> None:
    """Set the process's log level: the root logger's, as start-up's basicConfig sets it."""
    logging.getLogger().setLevel(level.upper())


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The changed settings that a reload cannot apply, by their configuration names."""
    changed = [
        f"[{section}] {key}"
        for section, key in RESTART_ONLY
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]
    changed += [
        f"[{name}]" for name in ("metrics", "demo") if getattr(old, name) != getattr(new, name)
    ]
    return changed


def reload(app: web.Application, new: GatewayConfig) -> None:
    """Apply a new configuration to a running app (SIGHUP).

    Routes whose settings are unchanged keep their topics and streams; topics of
    a changed or removed route end (their clients reconnect, under the new
    settings); limits, `trusted_proxies`, `drain_seconds`, `access_log` and
    `log_level` apply at once. What only a restart can change (`RESTART_ONLY`,
    the metrics listener, the demo) is named in a warning.
    """
    settings = app[SETTINGS]
    old = settings.config
    pending = restart_only_changes(old, new)
    if pending:
        log.warning("reload: %s changed; these apply after a restart", ", ".join(pending))
    if new.server.log_level != old.server.log_level:
        apply_log_level(new.server.log_level)
    # In place: streams already running hold this object and log their end with it.
    app[ACCESS].format = new.server.access_log
    routes = {r.name: r for r in new.routes}
    closed = app[HUB].close_route_topics(
        lambda target: routes.get(target.route.name) == target.route, "reload"
    )
    settings.config = new
    settings.routes = RouteTable(new.routes)
    settings.id_bytes = max(settings.id_bytes, new.limits.max_last_event_id_bytes)
    app[ADMISSION].update(new.limits)
    app[HUB].limits = new.limits
    app[WHEEL].retune(HeartbeatWheel.tick_for([r.heartbeat_seconds for r in new.routes]))
    log_cors(new)
    unchanged = sum(1 for r in old.routes if routes.get(r.name) == r)
    log.info(
        "reloaded: %d routes, %d unchanged; %d topics of changed routes closed",
        len(new.routes),
        unchanged,
        closed,
    )


def log_cors(config: GatewayConfig) -> None:
    """Say once what each route lets a cross-origin page do: a silent default confuses."""
    for route in config.routes:
        log.info("route %r: %s", route.name, policy.describe_cors(route))

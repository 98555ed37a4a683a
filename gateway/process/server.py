"""The process: listeners, signals, drain, reload and graceful shutdown.

Shutdown order on SIGTERM or SIGINT: `/readyz` turns 503 at once (the
listener stays open so load balancers can see it), streams are ended in
jittered waves over `drain_seconds`, each with a `retry:` hint, then the
listener stops, any stream left is ended cleanly, upstreams are closed, and
anything still running after `shutdown_timeout_seconds` is cancelled. So the
process exits within drain_seconds + shutdown_timeout_seconds. A second
signal exits at once, as uvicorn does.

SIGHUP reloads the configuration from the same sources; an invalid one is
logged and the running configuration keeps serving.

Start-up fails as one `StartupError` naming the listener (a port in use, a
certificate that cannot be loaded), after every listener already started is
closed again, so `__main__` prints one line and exits 2. The metrics listener
left at its default that cannot bind (a second gateway on the host holds the
port) is not a failure: metrics are served on the main port instead, and the
log says where.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

from ..app import drain, make_app, make_metrics_app, make_runner, reload
from ..config import GatewayConfig, Listen
from ..demo import make_demo_app
from ..errors import ConfigError
from ..metrics import Metrics
from ..tls import TLSError, server_context
from .supervisor import worker_index

log = logging.getLogger(__name__)

# Kernel cap on the accept queue is net.core.somaxconn (4096 on current
# kernels); ask for that so a reconnect wave after a deploy is queued, not refused.
ACCEPT_BACKLOG = 4096


class StartupError(Exception):
    """The process cannot start serving; the message is one line for an operator."""


def _bind_problem(exc: OSError) -> str:
    """ "address already in use" rather than asyncio's "[Errno 98] error while attempting..."."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit: one fd per subscriber."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
            return soft
        log.info("raised the open-files limit from %d to %d", soft, hard)
        return hard
    return soft


class _BindError(Exception):
    def __init__(self, listen: Listen, name: str, exc: OSError) -> None:
        super().__init__(f"cannot listen on {listen} ({name}): {_bind_problem(exc)}")
        self.errno = exc.errno


async def _start(
    runner: web.AppRunner,
    listen: Listen,
    name: str,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Set up and bind `runner`; on a bind failure it is cleaned up and _BindError raised."""
    await runner.setup()
    site = web.TCPSite(
        runner,
        listen.host,
        listen.port,
        backlog=ACCEPT_BACKLOG,
        reuse_address=True,
        # Workers share the port; the kernel spreads new connections across them.
        reuse_port=reuse_port or None,
        ssl_context=ssl_context,
    )
    try:
        await site.start()
    except OSError as exc:
        # Setup ran the app's startup hooks (its upstream client session): undo them.
        await runner.cleanup()
        raise _BindError(listen, name, exc) from None
    return runner


async def _start_metrics(
    config: GatewayConfig, metrics: Metrics, reuse_port: bool
) -> tuple[GatewayConfig, web.AppRunner | None]:
    """Start the metrics listener, or fall back to the main port when its default is taken.

    Decided before the main app is built: `make_app` mounts the metrics path on the
    main app only when `metrics.listen` is None.
    """
    listen = config.metrics.listen
    if not config.metrics.enabled or listen is None:
        return config, None
    runner = web.AppRunner(make_metrics_app(metrics, config.metrics.path), access_log=None)
    try:
        return config, await _start(runner, listen, "metrics", None, reuse_port)
    except _BindError as exc:
        if not config.metrics.listen_is_default or exc.errno != errno.EADDRINUSE:
            raise
    log.warning(
        "metrics: %s is in use (another gateway on this host?); serving %s on the main port "
        "instead (set [metrics] listen or --metrics-listen to choose)",
        listen,
        config.metrics.path,
    )
    return dataclasses.replace(
        config, metrics=dataclasses.replace(config.metrics, listen=None)
    ), None


async def serve(
    config: GatewayConfig,
    stop: asyncio.Event | None = None,
    load_config: Callable[[], GatewayConfig] | None = None,
) -> None:
    """Run until `stop` is set or a SIGTERM/SIGINT arrives, then shut down gracefully.

    `load_config` reads the configuration again for SIGHUP.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    def on_reload() -> None:
        if load_config is None:
            log.warning("SIGHUP: no configuration source to reload from")
            return
        try:
            new = load_config()
        except ConfigError as exc:
            log.error(
                "SIGHUP: new configuration rejected, keeping the running one:\n  %s",
                "\n  ".join(exc.problems),
            )
            return
        if new.metrics == requested:  # unchanged: the listener chosen at start-up stays
            new = dataclasses.replace(new, metrics=config.metrics)
        reload(app, new)

    timeout = config.server.shutdown_timeout_seconds
    scheme = "http" if config.server.tls_cert_file is None else "https"
    shared_port = config.server.workers > 1
    runners: list[web.AppRunner] = []  # started so far, to close on a failed start
    try:
        # Before anything listens: an unusable certificate or key stops startup here.
        try:
            tls = server_context(config.server)
        except TLSError as exc:
            raise StartupError(f"invalid TLS configuration: {exc}") from None
        metrics = Metrics()
        requested = config.metrics
        config, metrics_runner = await _start_metrics(config, metrics, shared_port)
        if metrics_runner is not None:
            runners.append(metrics_runner)
        # With workers, one demo backend (in worker 0) serves them all.
        if config.demo.enabled and worker_index() in (None, 0):
            demo_app = make_demo_app(interval_seconds=config.demo.interval_seconds)
            demo = web.AppRunner(
                demo_app, handler_cancellation=True, shutdown_timeout=timeout, access_log=None
            )
            runners.append(await _start(demo, config.demo.listen, "demo"))
            log.info("demo backend on http://%s", config.demo.listen)
        app = make_app(config, metrics=metrics)
        runner = await _start(make_runner(app), config.server.listen, "public", tls, shared_port)
    except BaseException as exc:
        # Whatever stopped the start (a bug included): what already listens is closed.
        for started in reversed(runners):
            await started.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if isinstance(exc, _BindError | StartupError):
            raise StartupError(str(exc)) from None
        raise
    runners.append(runner)
    if tls is not None:  # the paths only: key material never reaches a log
        log.info(
            "TLS certificate %s, key %s", config.server.tls_cert_file, config.server.tls_key_file
        )
    if config.metrics.enabled:
        where = config.metrics.listen or config.server.listen
        log.info(
            "metrics on %s://%s%s",
            "http" if metrics_runner is not None else scheme,
            where,
            config.metrics.path,
        )
    loop.add_signal_handler(signal.SIGHUP, on_reload)  # only now is there an app to reload
    log.info(
        "sse-gateway listening on %s://%s (%d routes)",
        scheme,
        config.server.listen,
        len(config.routes),
    )
    if config.demo.enabled:
        log.info("open %s://%s/ to watch the demo topics", scheme, config.server.listen)
    try:
        await stop.wait()
        await drain(app)
    finally:
        for started in reversed(runners):  # the public listener first
            await started.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        log.info("stopped")

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
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from ..app import METRICS, drain, make_app, make_metrics_app, make_runner, reload
from ..config import GatewayConfig, Listen
from ..demo import make_demo_app
from ..errors import ConfigError
from ..tls import server_context
from .supervisor import worker_index

log = logging.getLogger(__name__)

# Kernel cap on the accept queue is net.core.somaxconn (4096 on current
# kernels); ask for that so a reconnect wave after a deploy is queued, not refused.
ACCEPT_BACKLOG = 4096


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


async def _start(
    runner: web.AppRunner,
    listen: Listen,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
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
    await site.start()
    return runner


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
        reload(app, new)

    timeout = config.server.shutdown_timeout_seconds
    # Before anything listens: an unusable certificate or key stops startup here.
    tls = server_context(config.server)
    scheme = "http" if tls is None else "https"
    shared_port = config.server.workers > 1
    # With workers, one demo backend (in worker 0) serves them all.
    demo_here = config.demo.enabled and worker_index() in (None, 0)
    demo_runner = None
    if demo_here:
        demo_app = make_demo_app(interval_seconds=config.demo.interval_seconds)
        demo = web.AppRunner(
            demo_app, handler_cancellation=True, shutdown_timeout=timeout, access_log=None
        )
        demo_runner = await _start(demo, config.demo.listen)
        log.info("demo backend on http://%s", config.demo.listen)
    app = make_app(config)
    runner = await _start(make_runner(app), config.server.listen, tls, shared_port)
    if tls is not None:  # the paths only: key material never reaches a log
        log.info(
            "TLS certificate %s, key %s", config.server.tls_cert_file, config.server.tls_key_file
        )
    metrics_runner = None
    if config.metrics.enabled and config.metrics.listen is not None:
        metrics_app = make_metrics_app(app[METRICS], config.metrics.path)
        metrics_runner = await _start(
            web.AppRunner(metrics_app, access_log=None), config.metrics.listen, None, shared_port
        )
        log.info("metrics on http://%s%s", config.metrics.listen, config.metrics.path)
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
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if demo_runner is not None:
            await demo_runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        log.info("stopped")

"""Worker processes: N copies of the gateway sharing the listening port.

With `[server] workers = N` (or "auto": one per core) the process started by
the user becomes a supervisor. It starts N workers (`python -m gateway` with
the same arguments), each with its own hub, all listening on the same port
with SO_REUSEPORT so the kernel spreads connections across them. It:

- restarts a worker that dies unexpectedly (after a short, growing pause, so
  a worker that cannot start does not spin), and marks its metrics dead;
- stops every worker and exits with EXIT_STARTUP when one reports that it
  cannot start (a port in use, a bad certificate): restarting would not help;
- forwards SIGTERM/SIGINT (drain and stop) and SIGHUP (reload) to every
  worker, and exits once all of them have, within their own timeouts;
- points every worker at one prometheus-client multi-process directory, made
  empty at start, so any worker's `/metrics` reports the sum over workers.

The trade-off: each worker keeps its own upstream subscription per topic, so
a topic followed through N workers costs up to N upstream connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from ..config import GatewayConfig

log = logging.getLogger(__name__)

WORKER_ENV = "SSE_GATEWAY_WORKER_INDEX"
# The exit status of a process that could not start (configuration, listeners, TLS), as
# argparse uses for usage errors; a worker exiting with it is not restarted.
EXIT_STARTUP = 2
# A worker that dies this soon after starting is failing to start: back off.
QUICK_DEATH_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 30.0


def worker_index() -> int | None:
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM (a drain) when the supervisor dies, however it dies.

    Without this a supervisor killed with SIGKILL would leave its workers serving on,
    unsupervised. Linux-only (prctl PR_SET_PDEATHSIG); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def supervise(config: GatewayConfig, argv: Sequence[str]) -> int:
    """Run `config.server.workers` workers until a signal ends them; the exit status."""
    count = config.server.workers
    metrics_dir = tempfile.mkdtemp(prefix="sse-gateway-metrics-")
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    workers: dict[int, asyncio.subprocess.Process] = {}
    failures = [0] * count

    def forward(signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if stopping.is_set():
                log.warning("second %s: killing the workers", signal.Signals(signum).name)
                for proc in workers.values():
                    proc.kill()
                return
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(workers))
            stopping.set()
        for proc in workers.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, forward, signum)

    async def start(index: int) -> asyncio.subprocess.Process:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir, **{WORKER_ENV: str(index)})
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *argv, env=env)
        log.info("worker %d started, pid %d", index, proc.pid)
        return proc

    async def keep(index: int) -> int:
        """Run worker `index`, restarting it until the supervisor stops; its last status."""
        while True:
            started = loop.time()
            proc = workers[index] = await start(index)
            status = await proc.wait()
            _mark_dead(proc.pid, metrics_dir)
            if stopping.is_set():
                return status
            if status == EXIT_STARTUP:
                log.error("worker %d could not start: stopping every worker", index)
                forward(signal.SIGTERM)
                return status
            lived = loop.time() - started
            failures[index] = failures[index] + 1 if lived < QUICK_DEATH_SECONDS else 0
            delay = (
                min(MAX_RESTART_DELAY_SECONDS, 0.5 * 2 ** failures[index])
                if failures[index]
                else 0.0
            )
            log.error(
                "worker %d (pid %d) exited with status %d; restarting in %.1fs",
                index,
                proc.pid,
                status,
                delay,
            )
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return status

    log.info("supervising %d workers (metrics summed in %s)", count, metrics_dir)
    try:
        statuses = await asyncio.gather(*(keep(i) for i in range(count)))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    if EXIT_STARTUP in statuses:
        return EXIT_STARTUP
    return 0 if all(s == 0 for s in statuses) else 1


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the summed metrics (prometheus-client's rule)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]

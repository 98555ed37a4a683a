"""The native SSE load client (bench/sseload.c) as a child process, for bench.compare.

`build()` compiles bench/sseload.c with Debian's gcc (``gcc -O2 -Wall -Wextra -Werror -std=c11``)
into bench/.build/sseload when the source is newer than the binary (or there is no binary).
`CLoad.start()` runs it, and its methods send it one line command each on stdin and read its
one-line JSON answer from stdout (the protocol is described at the top of sseload.c):

* `connect()`: open every stream (at most `parallel` connecting at once); connected, failures.
* `wait_first_events()`: wait until every open stream has had an event; how many have not.
* `snapshot()`: totals as a `CSnapshot` (counters, silent streams since the previous snapshot,
  the latency samples recorded since it, the client's own CPU from getrusage).
* `record(on)`: start or stop recording latency samples; `churn(rate, seconds)`.
* `close()`: ``stop``, then SIGTERM and SIGKILL to its PID if it has not exited.

`window(a, b)` turns two consecutive snapshots into a `bench.client.Window`, the figures
bench.compare reports for the Python client. Only loopback targets are accepted (by the C
program itself, too), and the program ends by itself after `max_seconds` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from bench.client import Window

SOURCE = Path(__file__).resolve().with_name("sseload.c")
BUILD_DIR = Path(__file__).resolve().with_name(".build")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=c11")
STOP_GRACE = 5.0  # seconds after `stop`, then after SIGTERM, before the next step
ANSWER_MARGIN = 15.0  # seconds an answer may take beyond the time the command itself allows
MAX_LINE = 256 * 1024 * 1024  # a snapshot line holds up to --max-samples numbers


def compiler() -> str | None:
    """Debian's gcc, if installed."""
    return shutil.which("gcc")


def build(source: Path = SOURCE, out_dir: Path = BUILD_DIR) -> Path:
    """The binary for `source`, compiled first if missing or older than the source."""
    binary = out_dir / source.stem
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    gcc = compiler()
    if gcc is None:
        raise RuntimeError(f"gcc is not installed (apt-get install gcc): cannot build {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{source.stem}.{os.getpid()}.tmp"
    done = subprocess.run(
        [gcc, *CFLAGS, "-o", str(tmp), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {source} failed:\n{done.stderr}")
    os.replace(tmp, binary)  # atomic: a concurrent build never runs a half-written binary
    return binary


@dataclass(frozen=True)
class CSnapshot:
    """The C client's totals at one moment, over the streams whose first connect succeeded."""

    at: float  # CLOCK_MONOTONIC seconds in the client
    connected: int  # streams whose first connect succeeded
    open: int  # of those, streaming now
    events: int
    lost: int
    gaps: int
    dups: int
    closed: int  # not streaming now (between a close and a successful reopen, or given up)
    errors: int  # streams that saw a protocol failure
    ends: int
    reopens: int
    cycles: int
    silent: int  # streams with no event since the previous snapshot
    failed: dict[str, int]  # first connects, by reason
    reopen_failures: dict[str, int]  # failed reopen attempts, by reason
    broken: dict[str, int]  # streams ended after their headers, by reason
    cpu_user: float  # CPU seconds of the client process so far, in user space
    cpu_system: float  # ... and in the kernel on its behalf
    maxrss_kib: int
    samples: list[float]  # latency samples (s) recorded since the previous snapshot
    samples_dropped: int  # samples over --max-samples, not kept

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_user + self.cpu_system

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CSnapshot:
        return cls(
            at=float(d["at"]),
            connected=int(d["connected"]),
            open=int(d["open"]),
            events=int(d["events"]),
            lost=int(d["lost"]),
            gaps=int(d["gaps"]),
            dups=int(d["dups"]),
            closed=int(d["closed"]),
            errors=int(d["errors"]),
            ends=int(d["ends"]),
            reopens=int(d["reopens"]),
            cycles=int(d["cycles"]),
            silent=int(d["silent"]),
            failed=dict(d["failed"]),
            reopen_failures=dict(d["reopen_failures"]),
            broken=dict(d["broken"]),
            cpu_user=float(d["cpu_user"]),
            cpu_system=float(d["cpu_sys"]),
            maxrss_kib=int(d["maxrss_kib"]),
            samples=[float(x) for x in d["samples"]],
            samples_dropped=int(d["samples_dropped"]),
        )


def window(a: CSnapshot, b: CSnapshot) -> Window:
    """What happened between `a` and `b`; `b` must be the snapshot taken right after `a` (its
    `silent` counts the streams that got nothing since the previous snapshot)."""
    return Window(
        seconds=b.at - a.at,
        events=b.events - a.events,
        lost=b.lost - a.lost,
        gaps=b.gaps - a.gaps,
        dups=b.dups - a.dups,
        closed=b.closed - a.closed,
        errors=b.errors - a.errors,
        silent=b.silent,
        ends=b.ends - a.ends,
        reopens=b.reopens - a.reopens,
        cycles=b.cycles - a.cycles,
    )


def argv_for(
    binary: Path,
    *,
    port: int,
    path: str,
    n: int,
    topics: int = 1,
    sample_every: int = 1,
    seq_from: Literal["data", "id"] = "data",
    reconnect: bool = True,
    cycle_delay: float = 0.5,
    parallel: int = 200,
    connect_timeout: float = 10.0,
    max_seconds: float = 600.0,
    http10: bool = False,
) -> list[str]:
    """sseload's command line. `path` gets the suffixes 0..topics-1 when topics > 1, as
    `bench.client.topic_paths` does."""
    argv = [str(binary), "--port", str(port), "--path", path, "-n", str(n)]
    argv += ["--topics", str(topics), "--sample-every", str(sample_every), "--seq-from", seq_from]
    argv += ["--cycle-delay", str(cycle_delay), "--parallel", str(parallel)]
    argv += ["--connect-timeout", str(connect_timeout), "--max-seconds", str(max_seconds)]
    if not reconnect:
        argv.append("--no-reconnect")
    if http10:
        argv.append("--http10")
    return argv


class CLoad:
    """One running sseload process; one command at a time."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        reader: asyncio.StreamReader,
        transport: asyncio.BaseTransport,
        log: Path | None,
    ) -> None:
        self.proc = proc
        self._reader = reader
        self._transport = transport
        self.log = log
        self._lock = asyncio.Lock()
        self.stopped_cpu_seconds: float | None = None  # its CPU at `stop`, once closed

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, argv: Sequence[str], log: Path | None = None) -> CLoad:
        """Start sseload with `argv` (see `argv_for`); its stderr goes to `log` if given."""
        proc = _spawn(argv, log)
        assert proc.stdout is not None
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=MAX_LINE)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), proc.stdout
            )
        except BaseException:
            cls._kill(proc)
            raise
        return cls(proc, reader, transport, log)

    def _log_tail(self) -> str:
        if self.log is None:
            return ""
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def _ask(self, command: str, within: float) -> dict[str, Any]:
        async with self._lock:
            stdin = self.proc.stdin
            assert stdin is not None
            try:
                stdin.write(command.encode() + b"\n")
                stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(
                    f"sseload (pid {self.pid}) is gone ({self.proc.poll()}): {self._log_tail()}"
                ) from None
            try:
                line = await asyncio.wait_for(self._reader.readline(), within)
            except TimeoutError:
                raise TimeoutError(f"sseload: no answer to {command!r} in {within}s") from None
            if not line:
                code = self.proc.wait(STOP_GRACE)
                raise RuntimeError(f"sseload exited ({code}) on {command!r}: {self._log_tail()}")
            answer: dict[str, Any] = json.loads(line)
            if answer.get("type") == "error":
                raise RuntimeError(f"sseload refused {command!r}: {answer.get('message')}")
            return answer

    async def connect(self, within: float) -> tuple[int, dict[str, int]]:
        """Open every stream; those not connected after `within` seconds count as failed.
        Returns (streams connected, failed first connects by reason)."""
        answer = await self._ask(f"connect {within:.3f}", within + ANSWER_MARGIN)
        return int(answer["connected"]), dict(answer["failed"])

    async def wait_first_events(self, within: float) -> int:
        """Wait until every open stream has had an event; return how many still have none."""
        answer = await self._ask(f"wait-first {within:.3f}", within + ANSWER_MARGIN)
        return int(answer["waiting"])

    async def snapshot(self) -> CSnapshot:
        return CSnapshot.from_json(await self._ask("snapshot", ANSWER_MARGIN))

    async def record(self, on: bool) -> None:
        await self._ask("record on" if on else "record off", ANSWER_MARGIN)

    async def churn(self, per_second: float, seconds: float) -> None:
        """Close `per_second` random open streams a second (in 10 steps) for `seconds`, each
        reopened with Last-Event-ID after the --cycle-delay it was started with."""
        await self._ask(f"churn {per_second:.3f} {seconds:.3f}", ANSWER_MARGIN)

    async def close(self) -> str:
        """Stop the client: the `stop` command, then SIGTERM, then SIGKILL, by its PID."""
        how = "had exited"
        if self.proc.poll() is None:
            try:
                answer = await self._ask("stop", STOP_GRACE)
                self.stopped_cpu_seconds = float(answer["cpu_user"]) + float(answer["cpu_sys"])
            except (RuntimeError, TimeoutError, OSError, ValueError):
                pass
            how = await self._wait_or_signal()
        self._transport.close()
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        return how

    async def _wait_or_signal(self) -> str:
        for sig, label in ((None, "exited"), (signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "KILL")):
            if sig is not None and self.proc.poll() is None:
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = await asyncio.to_thread(self.proc.wait, STOP_GRACE)
                return f"{label} ({code})"
        return "did not exit after SIGKILL"

    def kill(self) -> None:
        """Synchronous last resort (no event loop needed): SIGKILL if still running."""
        self._kill(self.proc)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_GRACE)


def _spawn(argv: Sequence[str], log: Path | None) -> subprocess.Popen[bytes]:
    """Popen (not asyncio's subprocess): `poll()` and `wait()` then reap exactly this PID, so a
    signal sent by `CLoad` can never reach another process, with or without an event loop."""
    err: IO[bytes] | None = log.open("ab") if log is not None else None
    try:
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
        )
    finally:
        if err is not None:
            err.close()

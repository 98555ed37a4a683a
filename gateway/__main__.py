"""`sse-gateway` / `python -m gateway`: load the configuration, then serve on uvloop."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvloop

from .config import load, parse_args
from .config.dump import dump
from .errors import ConfigError
from .process.server import StartupError, raise_fd_limit, serve
from .process.supervisor import EXIT_STARTUP, die_with_supervisor, supervise, worker_index


def _fail(message: str) -> int:
    # One write: stderr is write-through, and print() writes the text and the newline
    # apart, so the lines of workers failing at once would interleave.
    sys.stderr.write(f"sse-gateway: {message}\n")
    return EXIT_STARTUP


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args)
    except ConfigError as exc:
        if len(exc.problems) == 1:
            return _fail(f"invalid configuration: {exc.problems[0]}")
        return _fail("invalid configuration:" + "".join(f"\n  {p}" for p in exc.problems))
    if args.check:
        print(dump(config), end="")
        return 0
    index = worker_index()
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s "
        + ("" if index is None else f"[worker {index}] ")
        + "%(name)s: %(message)s",
    )
    raise_fd_limit()
    if worker_index() is not None:
        die_with_supervisor()
    elif config.server.workers > 1:
        return uvloop.run(supervise(config, sys.argv[1:] if argv is None else list(argv)))
    try:
        uvloop.run(serve(config, load_config=lambda: load(args)))
    except StartupError as exc:  # a port in use, a certificate that cannot be loaded...
        return _fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

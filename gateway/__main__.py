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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args)
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"sse-gateway: invalid configuration: {exc.problems[0]}", file=sys.stderr)
        else:
            print("sse-gateway: invalid configuration:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return EXIT_STARTUP
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
        print(f"sse-gateway: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The "typical hand-written proxy": one upstream request per client, chunks copied as they come.

Usage: python -m bench.naive_proxy --port P --upstream 'http://127.0.0.1:UP/stream/{topic}'
                                   [--host 127.0.0.1]

``GET /events/{topic}`` opens ``GET <upstream with {topic}>`` with a shared aiohttp
`ClientSession` (no connection limit), forwards the client's ``Last-Event-ID``, and copies every
chunk the upstream sends with ``await resp.write(chunk)`` until either side ends. No shared
subscription, no replay ring, no batching: what the benchmark compares the gateway against as
the baseline a team would write in an afternoon. Runs on uvloop, like the gateway.

Prints "listening on" to stderr when ready; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import aiohttp
import uvloop
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)


async def events(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = request.app[UPSTREAM].replace("{topic}", request.match_info["topic"])
    headers = {"Accept": "text/event-stream"}
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    resp: web.StreamResponse | None = None
    try:
        async with session.get(url, headers=headers) as upstream:
            if upstream.status != 200:
                return web.Response(status=502, text=f"upstream status {upstream.status}")
            resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
            resp.content_type = "text/event-stream"
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
    except (aiohttp.ClientError, ConnectionError):
        if resp is None:
            return web.Response(status=502, text="upstream unreachable")
    assert resp is not None
    return resp


async def serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=10),
        auto_decompress=False,
    )
    app[SESSION] = session
    app[UPSTREAM] = upstream
    app.router.add_get("/events/{topic}", events)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"naive proxy listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_proxy", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="URL with {topic}")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())

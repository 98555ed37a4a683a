"""SSE upstream generator for the fan-out benchmark.

Usage: python -m bench.upstream --port P [--host 127.0.0.1] --rate EVENTS_PER_SEC --size BYTES
                               [--publish-url URL --topics N [--publish-ws]]

``GET /stream/{topic}`` streams ``id: <seq>`` / ``data: {"t":<send time>,"seq":<seq>,"pad":"x…"}``
events, ``--rate`` per second per topic, with ``data`` of ``--size`` bytes (at least the
timestamp and seq). ``t`` is ``time.time()`` (µs) taken just before the batch is handed to the
connections, so a reader can measure latency from the moment the upstream writes.

One generator task per topic, shared by every connection to that topic, paced on a fixed schedule
(event n is due at start + n / rate, so pacing never drifts); it wakes at most every `TICK`
seconds and sends every event due as one batch (one write per connection). Sequence numbers
increase per topic for the life of the process, across reconnects: the generator stops when a
topic's last connection leaves and resumes where it was. ``Last-Event-ID`` is ignored (always
live). ``GET /stats`` returns ``{topic: {"seq": last seq, "connections": n}}`` as JSON.

Publisher mode (``--publish-url http://127.0.0.1:P/pub/{topic}``, for nchan): topics t0..t{N-1}
are generated from the start, on the same schedule, and each event's data (the same JSON, no SSE
framing) is POSTed to the URL, one request at a time per topic so they arrive in order (the
``t`` stamp is taken just before each POST; the seq is in the data only, since nchan assigns its
own event ids). With ``--publish-ws`` every topic instead keeps one WebSocket to the URL (nchan's
WebSocket publisher) and sends each event as a text message, which a Python publisher can do at
much higher rates. ``/stats`` then also reports ``publish_errors`` and ``publish_connections``
(connections the publisher opened) per topic.

Prints "listening on" to stderr when ready; SIGTERM/SIGINT end every stream and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence

import aiohttp
import uvloop
from aiohttp import web

# Batch period for high rates: every event due within it goes out in one write.
TICK = 0.010
# A connection whose queue holds this many unsent batches is cut off (the reader is stuck).
MAX_QUEUED_BATCHES = 10_000


def encode_data(seq: int, sent_at: float, size: int) -> bytes:
    """An event's data, about `size` bytes: timestamp, seq, then padding."""
    head = b'{"t":%.6f,"seq":%d,"pad":"' % (sent_at, seq)
    pad = max(0, size - len(head) - 2)
    return b'%b%b"}' % (head, b"x" * pad)


def encode_event(seq: int, sent_at: float, size: int) -> bytes:
    """One SSE event whose data is about `size` bytes: timestamp, seq, then padding."""
    return b"id: %d\ndata: %b\n\n" % (seq, encode_data(seq, sent_at, size))


class Topic:
    """One topic's sequence, its connections (one queue each) and its generator task."""

    def __init__(self, name: str, rate: float, size: int) -> None:
        self.name = name
        self.rate = rate
        self.size = size
        self.seq = 0
        self.queues: set[asyncio.Queue[bytes | None]] = set()
        self.task: asyncio.Task[None] | None = None

    def add(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queues.add(queue)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._generate(), name=f"generate {self.name}")

    def remove(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queues.discard(queue)

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while self.queues:
            now = loop.time()
            # Event k (k = 0, 1, ...) of this run is due at start + k / rate.
            due = int((now - start) * self.rate) + 1 - sent
            if due > 0:
                sent_at = time.time()
                parts = []
                for _ in range(due):
                    self.seq += 1
                    parts.append(encode_event(self.seq, sent_at, self.size))
                batch = b"".join(parts)
                for queue in list(self.queues):
                    if queue.qsize() >= MAX_QUEUED_BATCHES:
                        self.queues.discard(queue)
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(batch)
                sent += due
            next_due = start + sent / self.rate
            await asyncio.sleep(max(next_due, now + TICK) - loop.time())


class Publisher:
    """Publisher mode: one task per topic POSTs (or sends over a WebSocket) every event."""

    def __init__(self, url: str, topics: int, rate: float, size: int, ws: bool) -> None:
        self.url = url
        self.rate = rate
        self.size = size
        self.ws = ws
        self.names = [f"t{i}" for i in range(topics)]
        self.seq = dict.fromkeys(self.names, 0)
        self.errors = dict.fromkeys(self.names, 0)
        self.conns = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()

        async def created(*_: object) -> None:
            self.conns += 1

        trace.on_connection_create_end.append(created)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=10),
            trace_configs=[trace],
        )
        for name in self.names:
            self.tasks.append(asyncio.create_task(self._run(name), name=f"publish {name}"))

    async def _run(self, name: str) -> None:
        assert self.session is not None
        url = self.url.replace("{topic}", name)
        ws: aiohttp.ClientWebSocketResponse | None = None
        drain: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            if self.ws:
                ws = await self.session.ws_connect(url, autoping=True)
                drain = asyncio.create_task(self._drain(ws))
            start = loop.time()
            sent = 0
            while True:
                now = loop.time()
                due = int((now - start) * self.rate) + 1 - sent
                for _ in range(max(0, due)):
                    self.seq[name] += 1
                    data = encode_data(self.seq[name], time.time(), self.size)
                    if ws is not None:
                        await ws.send_str(data.decode())
                    else:
                        await self._post(name, url, data)
                sent += max(0, due)
                next_due = start + sent / self.rate
                await asyncio.sleep(max(next_due, now + TICK) - loop.time())
        except (aiohttp.ClientError, OSError) as exc:
            self.errors[name] += 1
            print(f"publisher {name} stopped: {exc!r}", file=sys.stderr, flush=True)
        finally:
            if drain is not None:
                drain.cancel()
            if ws is not None:
                await ws.close()

    async def _post(self, name: str, url: str, data: bytes) -> None:
        assert self.session is not None
        try:
            async with self.session.post(
                url, data=data, headers={"Content-Type": "text/plain"}
            ) as resp:
                await resp.read()
                if resp.status >= 300:
                    self.errors[name] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.errors[name] += 1

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for _ in ws:
            pass  # nchan answers each published message with its status

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "seq": self.seq[name],
                "connections": 0,
                "publish_errors": self.errors[name],
                "publish_connections": self.conns,
            }
            for name in self.names
        }

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


class Generator:
    def __init__(self, rate: float, size: int) -> None:
        self.rate = rate
        self.size = size
        self.topics: dict[str, Topic] = {}
        self.closing = False
        self.publisher: Publisher | None = None

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, self.rate, self.size)
        return topic

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self.closing:
            raise web.HTTPServiceUnavailable()
        topic = self.topic(request.match_info["topic"])
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        await resp.write(b": ok\n\n")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        topic.add(queue)
        try:
            while True:
                data = await queue.get()
                # Behind (a slow write): coalesce whatever is queued into one write.
                parts = []
                while data is not None:
                    parts.append(data)
                    if queue.empty():
                        break
                    data = queue.get_nowait()
                if parts:
                    await resp.write(parts[0] if len(parts) == 1 else b"".join(parts))
                if data is None:
                    break
        except ConnectionError:
            pass
        finally:
            topic.remove(queue)
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        if self.publisher is not None:
            return web.json_response(self.publisher.stats())
        return web.json_response(
            {
                name: {"seq": topic.seq, "connections": len(topic.queues)}
                for name, topic in self.topics.items()
            }
        )

    async def close(self) -> None:
        self.closing = True
        if self.publisher is not None:
            await self.publisher.close()
        for topic in self.topics.values():
            for queue in list(topic.queues):
                queue.put_nowait(None)
            topic.queues.clear()
            if topic.task is not None:
                topic.task.cancel()
        tasks = [t.task for t in self.topics.values() if t.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(
    host: str, port: int, rate: float, size: int, publisher: Publisher | None = None
) -> None:
    gen = Generator(rate, size)
    gen.publisher = publisher
    app = web.Application()
    app.router.add_get("/stream/{topic}", gen.stream)
    app.router.add_get("/stats", gen.stats)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2, access_log=None)
    await runner.setup()
    # A 1:1 proxy opens one upstream connection per subscriber, 200 at once: a deep backlog.
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if publisher is not None:
        await publisher.start()
    print(
        f"bench upstream listening on http://{host}:{port} (rate {rate}/s, size {size})"
        + (f", publishing to {publisher.url}" if publisher else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await gen.close()
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second per topic")
    parser.add_argument("--size", type=int, default=200, help="bytes of data per event")
    parser.add_argument(
        "--publish-url", help="publisher mode: POST every event to this URL ({topic} replaced)"
    )
    parser.add_argument("--topics", type=int, default=1, help="publisher mode: topics t0..tN-1")
    parser.add_argument(
        "--publish-ws", action="store_true", help="publisher mode: one WebSocket per topic"
    )
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    publisher = None
    if args.publish_url:
        if not args.publish_url.startswith(("http://127.0.0.1", "http://localhost")):
            parser.error("--publish-url must be an http://127.0.0.1 URL")
        publisher = Publisher(args.publish_url, args.topics, args.rate, args.size, args.publish_ws)
    uvloop.run(serve(args.host, args.port, args.rate, args.size, publisher))
    return 0


if __name__ == "__main__":
    sys.exit(main())

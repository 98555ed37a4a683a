"""SSE upstream generator for the fan-out benchmark.

Usage: python -m bench.upstream --port P [--host 127.0.0.1] --rate EVENTS_PER_SEC --size BYTES

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

Prints "listening on" to stderr when ready; SIGTERM/SIGINT end every stream and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence

import uvloop
from aiohttp import web

# Batch period for high rates: every event due within it goes out in one write.
TICK = 0.010
# A connection whose queue holds this many unsent batches is cut off (the reader is stuck).
MAX_QUEUED_BATCHES = 10_000


def encode_event(seq: int, sent_at: float, size: int) -> bytes:
    """One SSE event whose data is about `size` bytes: timestamp, seq, then padding."""
    head = b'{"t":%.6f,"seq":%d,"pad":"' % (sent_at, seq)
    pad = max(0, size - len(head) - 2)
    return b'id: %d\ndata: %b%b"}\n\n' % (seq, head, b"x" * pad)


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


class Generator:
    def __init__(self, rate: float, size: int) -> None:
        self.rate = rate
        self.size = size
        self.topics: dict[str, Topic] = {}
        self.closing = False

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
        return web.json_response(
            {
                name: {"seq": topic.seq, "connections": len(topic.queues)}
                for name, topic in self.topics.items()
            }
        )

    async def close(self) -> None:
        self.closing = True
        for topic in self.topics.values():
            for queue in list(topic.queues):
                queue.put_nowait(None)
            topic.queues.clear()
            if topic.task is not None:
                topic.task.cancel()
        tasks = [t.task for t in self.topics.values() if t.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(host: str, port: int, rate: float, size: int) -> None:
    gen = Generator(rate, size)
    app = web.Application()
    app.router.add_get("/stream/{topic}", gen.stream)
    app.router.add_get("/stats", gen.stats)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(
        f"bench upstream listening on http://{host}:{port} (rate {rate}/s, size {size})",
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
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    uvloop.run(serve(args.host, args.port, args.rate, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

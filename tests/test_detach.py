"""An established stream keeps nothing of aiohttp alive (gateway/edge/stream.py `_detach`).

`_detach` takes the socket from aiohttp's RequestHandler through internal API (its transport
attribute and connection_lost), which is why pyproject.toml caps aiohttp at one minor
release. This test is what a new minor release must pass before the cap moves: once a
stream is established, the request, the response, aiohttp's protocol (RequestHandler) and
the handler's task are all garbage, while the stream still delivers events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry

from gateway.app import make_app, make_runner
from gateway.config import from_document
from gateway.metrics import Metrics

from .conftest import route_doc
from .support import Changes, Upstream, connect, events, start_runner


def live_handlers(exclude: object) -> list[RequestHandler]:
    """aiohttp's protocol objects still alive, but those of the server `exclude` (the upstream's).

    RequestHandler has __slots__ without __weakref__: found through the collector instead.
    """
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, RequestHandler) and getattr(o, "_manager", None) is not exclude
    ]


@dataclass
class Recorded:
    """What aiohttp built for each stream request, taken at prepare: weak references, and the
    protocol's id.

    An id is only unique among live objects; it identifies the protocol here because no
    connection is accepted after the stream's but the upstream's (made while the stream's
    protocol is alive, and excluded by server anyway).
    """

    upstream_server: object
    refs: list[tuple[str, weakref.ref[Any]]] = field(default_factory=list)
    protocols: list[int] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not request.path.startswith("/events/"):
            return
        assert isinstance(request, web.BaseRequest)
        protocol = request.protocol
        assert isinstance(protocol, RequestHandler)
        # The detector sees it while it is alive.
        assert any(h is protocol for h in live_handlers(self.upstream_server))
        self.protocols.append(id(protocol))
        self.refs += [
            ("request", weakref.ref(request)),
            ("response", weakref.ref(response)),
            ("handler task", weakref.ref(request.task)),
        ]
        self.changes.notify()

    def alive(self) -> list[str]:
        alive = [
            f"protocol: {h!r:.120}"
            for h in live_handlers(self.upstream_server)
            if id(h) in self.protocols
        ]
        return alive + [f"{name}: {ref()!r:.120}" for name, ref in self.refs if ref() is not None]


@pytest.fixture
async def recorded_gateway(upstream: Upstream) -> AsyncIterator[tuple[str, Recorded]]:
    """A real gateway (the conftest's settings) whose app records each stream's objects."""
    config = from_document(
        {
            "routes": [route_doc(upstream)],
            "limits": {"max_subscribers_per_client": 0, "max_connections_per_second": 0},
            "server": {"shutdown_timeout_seconds": 2},
            "metrics": {"listen": ""},
        },
        {},
    )
    app = make_app(config, metrics=Metrics(CollectorRegistry()))
    assert upstream.runner is not None
    recorded = Recorded(upstream.runner.server)
    # A signal, not a middleware: the app's middlewares are the gateway's own, and the
    # response object exists only from prepare on.
    app.on_response_prepare.append(recorded.on_prepare)
    runner = make_runner(app)
    port = await start_runner(runner)
    try:
        yield f"http://127.0.0.1:{port}", recorded
    finally:
        await runner.cleanup()


async def test_an_established_stream_leaves_no_aiohttp_object_alive(
    upstream: Upstream, recorded_gateway: tuple[str, Recorded], session: aiohttp.ClientSession
) -> None:
    base, recorded = recorded_gateway
    client = await connect(session, f"{base}/events/a")
    try:
        await upstream.wait_open("a")
        await recorded.changes.until(lambda: len(recorded.refs) == 3)
        await upstream.publish("a", *events("a", 1, 1))
        await client.wait_events(1)

        # The handler's task ends a loop turn or two after the hand-over (aiohttp cancels it
        # as for a client that left): give what is alive a bounded time to be released, then
        # name what is left.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while recorded.alive():  # noqa: ASYNC110
                    await asyncio.sleep(0)  # a loop turn per collection, not a timed wait
        assert recorded.alive() == []

        # Nothing of aiohttp's is needed for the stream to go on: the next event arrives.
        await upstream.publish("a", *events("a", 2, 1))
        got = await client.wait_events(2)
        assert [e.id for e in got] == ["1", "2"]
        assert not client.ended
        assert recorded.alive() == []
    finally:
        client.close()

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import HUB, make_app, make_runner
from gateway.config import GatewayConfig, from_document
from gateway.core.hub import Hub
from gateway.metrics import Metrics

from .support import FakeClock, ScriptedUpstreams, Upstream


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # Production runs on uvloop; so do the tests (its transports differ from asyncio's).
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # limit=0: tests hold hundreds of streams at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@dataclass
class Gateway:
    app: web.Application
    runner: web.AppRunner
    port: int
    config: GatewayConfig
    registry: CollectorRegistry

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def metric_total(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include `labels` (any others)."""
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    @property
    def hub(self) -> Any:
        return self.app[HUB]


def route_doc(upstream: Upstream, **options: Any) -> dict[str, Any]:
    # A fixed retry so tests can assert exact bytes; production draws from a range.
    route = {
        "name": "r",
        "path": "/events/{topic}",
        "upstream": upstream.url(),
        "retry_ms": 3000,
        "retry_max_ms": 3000,
    }
    route.update(options)
    return route


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def start(*routes: dict[str, Any], port: int = 0, **sections: Any) -> Gateway:
        # Every test client is 127.0.0.1: per-address and rate limits are off unless a test
        # sets them.
        limits = {
            "max_subscribers_per_client": 0,
            "max_connections_per_second": 0,
            "topic_opens_per_client_per_second": 0,
            "max_topic_share_per_client": 1.0,
        }
        sections.setdefault("server", {}).setdefault("shutdown_timeout_seconds", 2)
        # In-process there is no second listener: serve /metrics on the gateway's own port.
        sections.setdefault("metrics", {}).setdefault("listen", "")
        limits.update(sections.pop("limits", {}))
        doc = {"routes": list(routes), "limits": limits, **sections}
        config = from_document(doc, {})
        registry = CollectorRegistry()
        app = make_app(config, metrics=Metrics(registry))
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Gateway(app, runner, port, config, registry)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


# --- hub-level fixtures: a scripted upstream, fake subscribers, a virtual clock ---------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstreams() -> ScriptedUpstreams:
    return ScriptedUpstreams()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def hub(upstreams: ScriptedUpstreams, clock: FakeClock, metrics: Metrics) -> Hub:
    return Hub(upstreams, clock, metrics)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"route": "r", **labels}) or 0.0

"""Path and query validation: hostile requests get 400/404 and never reach an upstream."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.config import from_document
from gateway.core.route import RouteTable
from gateway.errors import BadRequest, NotFound

from .conftest import GatewayFactory, route_doc
from .support import Upstream, connect, events, raw_request


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/events/..", 400),
        ("/events/.", 400),
        ("/events/%2E%2E", 400),
        ("/events/%2e", 400),
        ("/events/a%2Fb", 400),
        ("/events/..%2F..%2Fadmin", 400),
        ("/events/%00", 400),
        ("/events/a%0D%0AX-Injected:%201", 400),
        ("/events/%C0%AE", 400),  # overlong UTF-8 for "."
        ("/events/%ZZ", 400),
        ("/events/caf%C3%A9", 400),  # valid UTF-8, outside the default pattern
        ("/events/a/b", 404),
        ("/events/", 400),
        ("/events", 404),
        ("//evil.example/events/x", 404),
        ("/evil.example/events/x", 404),
        ("http://evil.example/x", 404),
        ("/other/x", 404),
    ],
)
async def test_hostile_paths_are_refused_and_reach_no_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, target: str, status: int
) -> None:
    gw = await make_gateway(route_doc(upstream))
    head = await raw_request(gw.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    assert upstream.connections == []
    assert gw.hub.topics == {}
    reason = "bad_request" if status == 400 else "not_found"
    assert gw.metric("sse_gateway_requests_rejected_total", reason=reason) == 1


async def test_host_header_and_absolute_form_cannot_choose_the_upstream(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream))
    head = await raw_request(gw.port, b"GET /events/ok HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await upstream.wait_connections(1)
    assert upstream.connections[0].host == f"127.0.0.1:{upstream.port}"
    assert upstream.connections[0].path == "/stream/ok"


async def test_non_get_methods_get_405(upstream: Upstream, make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(route_doc(upstream))
    head = await raw_request(
        gw.port, b"POST /events/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 405")
    assert b"Allow: GET, OPTIONS" in head
    assert upstream.connections == []


async def test_only_allow_listed_query_parameters_reach_upstream_and_topic_key(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, query=["symbols"]))
    a = await connect(session, gw.url("/events/q?symbols=a%20b&junk=1"))
    b = await connect(session, gw.url("/events/q?junk=2&symbols=a+b"))
    c = await connect(session, gw.url("/events/q?symbols=c"))
    await upstream.wait_open("q", 2)
    queries = sorted(r.raw_path.partition("?")[2] for r in upstream.connections)
    assert queries == ["symbols=a%20b", "symbols=c"]
    await upstream.publish("q", *events("q", 1, 1))
    for client in (a, b, c):
        assert await client.wait_events(1) == events("q", 1, 1)
        client.close()
    assert len(upstream.connections) == 2


def _table(**route: object) -> RouteTable:
    doc = {
        "routes": [
            {"name": "r", "path": "/t/{a}/x/{b}", "upstream": "https://up:8443/s/{b}/{a}", **route}
        ]
    }
    return RouteTable(from_document(doc, {}).routes)


def test_parameters_are_percent_encoded_into_the_upstream_path() -> None:
    table = _table(params={"a": r"[^/]+"})
    target = table.resolve("/t/a%20%3Fb%23c/x/ok", [])
    assert target.upstream_url == "https://up:8443/s/ok/a%20%3Fb%23c"
    assert target.topic_key == "r https://up:8443/s/ok/a%20%3Fb%23c"


def test_dot_segments_are_refused_even_when_the_pattern_allows_them() -> None:
    table = _table(params={"a": r".*", "b": r".*"})
    with pytest.raises(BadRequest):
        table.resolve("/t/../x/ok", [])
    with pytest.raises(NotFound):
        table.resolve("/t/a/y/ok", [])


def test_long_query_values_are_refused() -> None:
    table = _table(query=["q"])
    with pytest.raises(BadRequest):
        table.resolve("/t/a/x/b", [("q", "x" * 2000)])

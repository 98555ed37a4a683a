"""CORS on stream routes: exact origins echoed with Vary, credentials only by name, refusals
before any upstream."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, RouteConfig, from_document
from gateway.edge.policy import cors_headers, preflight_headers
from gateway.errors import CorsDenied

from .conftest import GatewayFactory, route_doc
from .support import LogWatcher, Upstream, connect

APP = "https://app.example"


def route(**options: Any) -> RouteConfig:
    doc = {"routes": [{"path": "/e/{t}", "upstream": "http://u/{t}", **options}]}
    return from_document(doc, {}).routes[0]


def test_no_allow_list_means_no_cors_headers() -> None:
    assert cors_headers(route(), APP) == {}


def test_allowed_origin_is_echoed_exactly_with_vary_and_no_credentials_by_default() -> None:
    headers = cors_headers(route(cors_origins=[APP, "https://b.example"]), APP)
    assert headers == {"Access-Control-Allow-Origin": APP, "Vary": "Origin"}


def test_credentials_only_when_configured_and_with_the_named_origin() -> None:
    r = route(cors_origins=[APP], cors_credentials=True, cors_expose_headers=["X-Trace"])
    assert cors_headers(r, APP) == {
        "Access-Control-Allow-Origin": APP,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "X-Trace",
        "Vary": "Origin",
    }


def test_credentials_with_wildcard_are_refused_at_config_load() -> None:
    with pytest.raises(ConfigError) as info:
        route(cors_origins=["*"], cors_credentials=True)
    assert info.value.problems == [
        'routes[0].cors_credentials: cannot be used with cors_origins = ["*"]'
    ]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://a.b.example.com", True),
        ("https://example.com", False),  # the pattern needs a subdomain
        ("https://evilexample.com", False),
        ("https://app.example.com.evil", False),
        ("http://app.example.com", False),  # scheme is part of the origin
        ("null", False),
    ],
)
def test_subdomain_patterns(origin: str, allowed: bool) -> None:
    r = route(cors_origins=["https://*.example.com"])
    if allowed:
        assert cors_headers(r, origin)["Access-Control-Allow-Origin"] == origin
    else:
        with pytest.raises(CorsDenied):
            cors_headers(r, origin)


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", APP + ".evil", "http://app.example"]
)
def test_other_origins_are_refused(origin: str) -> None:
    with pytest.raises(CorsDenied):
        cors_headers(route(cors_origins=[APP]), origin)


def test_wildcard_allows_any_origin_without_echoing_it() -> None:
    r = route(cors_origins=["*"])
    assert cors_headers(r, "https://any.example")["Access-Control-Allow-Origin"] == "*"
    assert cors_headers(r, "null")["Access-Control-Allow-Origin"] == "*"


def test_request_without_origin_passes_and_still_varies() -> None:
    assert cors_headers(route(cors_origins=[APP]), None) == {"Vary": "Origin"}


def test_preflight_names_method_headers_credentials_and_max_age() -> None:
    r = route(cors_origins=[APP], cors_credentials=True, cors_max_age_seconds=86400)
    headers = preflight_headers(r, APP)
    assert headers["Access-Control-Allow-Methods"] == "GET"
    for name in ("Last-Event-ID", "Authorization", "Cache-Control"):
        assert name in headers["Access-Control-Allow-Headers"]
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Max-Age"] == "86400"
    with pytest.raises(CorsDenied):
        preflight_headers(r, None)


async def test_disallowed_origin_gets_403_and_opens_no_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, cors_origins=[APP], cors_credentials=True))
    async with session.get(gw.url("/events/c"), headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with session.get(gw.url("/events/c"), headers={"Origin": "null"}) as resp:
        assert resp.status == 403
    assert upstream.connections == []
    assert gw.metric("sse_gateway_requests_rejected_total", reason="cors") == 2

    client = await connect(session, gw.url("/events/c"), headers={"Origin": APP})
    assert client.response.headers["Access-Control-Allow-Origin"] == APP
    assert client.response.headers["Access-Control-Allow-Credentials"] == "true"
    assert client.response.headers["Vary"] == "Origin"
    await upstream.wait_connections(1)
    client.close()


async def test_preflight_is_answered_without_touching_the_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, cors_origins=[APP]))
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id",
    }
    async with session.options(gw.url("/events/c"), headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert "Last-Event-ID" in resp.headers["Access-Control-Allow-Headers"]
    async with session.options(
        gw.url("/events/c"), headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert upstream.connections == []


async def test_each_routes_cors_policy_is_logged_once_at_start_and_the_default_is_as_said(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    with LogWatcher("gateway.app") as log:
        gw = await make_gateway(
            route_doc(upstream),
            route_doc(upstream, name="open", path="/open/{topic}", cors_origins=["*"]),
            route_doc(
                upstream,
                name="app",
                path="/app/{topic}",
                cors_origins=[APP],
                cors_credentials=True,
            ),
        )
    cors_lines = [line for line in log.records if "CORS" in line]
    assert cors_lines == [
        "route 'r': CORS off: responses carry no Access-Control-* headers, so a browser page "
        "on another origin cannot read the stream (the gateway still serves it: same-origin "
        "pages and non-browser clients get it) and its preflight gets 403",
        "route 'open': CORS for any origin (Access-Control-Allow-Origin: *), without credentials",
        f"route 'app': CORS for {APP} with credentials; other origins get 403",
    ]
    # What the first line says: a cross-origin request is served, with no CORS header (so a
    # browser withholds it from the page), and a preflight is refused.
    client = await connect(session, gw.url("/events/d"), headers={"Origin": APP})
    assert not any(h.lower().startswith("access-control-") for h in client.response.headers)
    assert "Vary" not in client.response.headers
    client.close()
    async with session.options(gw.url("/events/d"), headers={"Origin": APP}) as resp:
        assert resp.status == 403

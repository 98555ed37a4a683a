"""CORS on stream routes: exact origins echoed with Vary, refusals before any upstream."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.errors import Forbidden
from gateway.policy import cors_headers, preflight_headers

from .conftest import GatewayFactory, route_doc
from .support import Upstream, connect

APP = "https://app.example"


def test_no_allow_list_means_no_cors_headers() -> None:
    assert cors_headers((), APP) == {}


def test_allowed_origin_is_echoed_exactly_with_vary() -> None:
    assert cors_headers((APP, "https://b.example"), APP) == {
        "Access-Control-Allow-Origin": APP,
        "Vary": "Origin",
    }


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", APP + ".evil", "http://app.example"]
)
def test_other_origins_are_refused(origin: str) -> None:
    with pytest.raises(Forbidden):
        cors_headers((APP,), origin)


def test_wildcard_allows_any_origin_without_echoing_it() -> None:
    assert cors_headers(("*",), "https://any.example")["Access-Control-Allow-Origin"] == "*"


def test_request_without_origin_passes_and_still_varies() -> None:
    assert cors_headers((APP,), None) == {"Vary": "Origin"}


def test_preflight_names_method_headers_and_max_age() -> None:
    headers = preflight_headers((APP,), APP)
    assert headers["Access-Control-Allow-Methods"] == "GET"
    assert "Last-Event-ID" in headers["Access-Control-Allow-Headers"]
    assert int(headers["Access-Control-Max-Age"]) > 0
    with pytest.raises(Forbidden):
        preflight_headers((APP,), None)


async def test_disallowed_origin_gets_403_and_opens_no_upstream(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(route_doc(upstream, cors_origins=[APP]))
    async with session.get(gw.url("/events/c"), headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert upstream.connections == []
    assert gw.metric("sse_gateway_requests_rejected_total", reason="cors") == 1

    client = await connect(session, gw.url("/events/c"), headers={"Origin": APP})
    assert client.response.headers["Access-Control-Allow-Origin"] == APP
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

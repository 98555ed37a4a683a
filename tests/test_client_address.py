"""Who the client is: the peer, or behind trusted proxies the hop they name."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ConfigError, from_document
from gateway.edge.head import RequestHead
from gateway.edge.policy import client_address

from .conftest import GatewayFactory, route_doc
from .support import LogWatcher, Upstream, connect

LB = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # Not behind a trusted proxy: the header is client input and ignored.
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),
        # One trusted proxy: the hop it appended is the client.
        ("10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
        # What the client wrote itself (left of the first untrusted hop) proves nothing.
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),
        # Several trusted proxies, over several header lines.
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4", "10.1.1.1"], "1.2.3.4"),
        ("::1", ["2001:db8::7"], "2001:db8::7"),
        # Every hop trusted: the leftmost one is the client.
        ("10.0.0.2", ["10.9.9.9, 10.1.1.1"], "10.9.9.9"),
        # A malformed hop ends the walk at the last trusted one.
        ("10.0.0.2", ["1.2.3.4, garbage, 10.1.1.1"], "10.1.1.1"),
        ("10.0.0.2", ["unknown"], "10.0.0.2"),
        # Ports, as some load balancers write them.
        ("10.0.0.2", ["1.2.3.4:5678"], "1.2.3.4"),
        ("10.0.0.2", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("10.0.0.2", ["1.2.3.4, 10.1.1.1:80"], "1.2.3.4"),
        # IPv4-mapped IPv6 from dual-stack proxies: trusted as, and named by, the IPv4 address.
        ("10.0.0.2", ["1.2.3.4, ::ffff:10.1.1.1"], "1.2.3.4"),
        ("10.0.0.2", ["::ffff:1.2.3.4"], "1.2.3.4"),
        ("::ffff:10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
        # A zone id may carry anything after "%" (quotes, semicolons): not an address.
        ("10.0.0.2", ['fe80::1%x]";proto=https;host="evil.example'], "10.0.0.2"),
        # No header, or no peer at all.
        ("10.0.0.2", [], "10.0.0.2"),
        (None, ["1.2.3.4"], "unknown"),
    ],
)
def test_client_address(peer: str | None, forwarded_for: list[str], client: str) -> None:
    assert client_address(peer, forwarded_for, LB) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.0.0.2", ["1.2.3.4"], ()) == "10.0.0.2"


def test_trusted_proxies_are_validated_by_key() -> None:
    doc = {
        "server": {"trusted_proxies": ["10.0.0.1/8", "not-an-ip"]},
        "routes": [{"path": "/e/{t}", "upstream": "http://u/{t}"}],
    }
    with pytest.raises(ConfigError) as info:
        from_document(doc, {})
    assert info.value.problems == [
        "server.trusted_proxies: 10.0.0.1/8 has host bits set",
        "server.trusted_proxies: 'not-an-ip' does not appear to be an IPv4 or IPv6 network",
    ]


async def test_behind_a_trusted_proxy_limits_and_logs_key_on_the_forwarded_client(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(
        route_doc(upstream),
        server={"trusted_proxies": ["127.0.0.0/8"]},
        limits={"max_subscribers_per_client": 1},
    )
    with LogWatcher("gateway.access") as access:
        a = await connect(session, gw.url("/events/t"), headers={"X-Forwarded-For": "1.2.3.4"})
        # Another client behind the same proxy is not counted against the first.
        b = await connect(session, gw.url("/events/t"), headers={"X-Forwarded-For": "5.6.7.8"})
        spoof = {"X-Forwarded-For": "9.9.9.9, 1.2.3.4"}  # the client's own claim is ignored
        async with session.get(gw.url("/events/t"), headers=spoof) as resp:
            assert resp.status == 429
        await access.until(lambda lines: any("client=1.2.3.4" in line for line in lines))
    assert gw.metric("sse_gateway_subscribers", route="r") == 2
    a.close()
    b.close()


async def test_a_forwarded_header_from_an_untrusted_peer_changes_nothing(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(
        route_doc(upstream),
        server={"trusted_proxies": ["10.0.0.0/8"]},  # the test client, 127.0.0.1, is not one
        limits={"max_subscribers_per_client": 1},
    )
    a = await connect(session, gw.url("/events/t"), headers={"X-Forwarded-For": "1.2.3.4"})
    async with session.get(gw.url("/events/t"), headers={"X-Forwarded-For": "5.6.7.8"}) as resp:
        assert resp.status == 429  # both are 127.0.0.1, whatever they claim
    a.close()


@pytest.mark.parametrize(
    ("peer", "xff", "untrusted"),
    [
        ("10.0.0.5", "203.0.113.9", False),  # a trusted proxy, a client named
        ("10.0.0.5", "not-an-address", False),  # a trusted proxy, a malformed hop
        ("198.51.100.1", "203.0.113.9", True),  # an unlisted proxy naming a client
    ],
)
def test_only_an_unlisted_peer_naming_a_client_is_an_untrusted_forward(
    peer: str, xff: str, untrusted: bool
) -> None:
    config = from_document(
        {
            "server": {"trusted_proxies": ["10.0.0.0/8"]},
            "routes": [{"path": "/e/{t}", "upstream": "http://u/{t}"}],
        },
        {},
    )
    head = RequestHead(
        method="GET",
        raw_path="/e/a",
        query=(),
        headers=CIMultiDictProxy(CIMultiDict({"X-Forwarded-For": xff})),
        peer=peer,
        tls=False,
        scheme="http",
        host="x",
    )
    assert head.forwarded_untrusted(config) is untrusted


def test_an_ipv4_mapped_trusted_proxy_entry_matches_the_ipv4_peer() -> None:
    config = from_document(
        {
            "server": {"trusted_proxies": ["::ffff:10.0.0.0/104"]},
            "routes": [{"path": "/e/{t}", "upstream": "http://u/{t}"}],
        },
        {},
    )
    assert config.server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("::ffff:10.1.2.3", ["203.0.113.9"], config.server.trusted_proxies) == (
        "203.0.113.9"
    )

"""Authorization on real sockets: JWT (key and JWKS), forward auth, direct mode."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from gateway.app import reload
from gateway.config import ConfigError, from_document

from .conftest import GatewayFactory, route_doc
from .support import Changes, Upstream, connect, events, serve_app

SECRET = "test-secret-that-is-long-enough-for-hs256"


def token(secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {"exp": time.time() + 300, "topics": ["news", "prices.*"], **claims}
    return jwt.encode(body, secret, algorithm=algorithm)


def jwt_route(upstream: Upstream, **auth: Any) -> dict[str, Any]:
    return route_doc(upstream, auth={"type": "jwt", "key": SECRET, **auth})


async def status_of(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with session.get(url, **kwargs) as resp:
        return resp.status


async def test_bearer_token_allows_its_topics_and_refuses_others(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(jwt_route(upstream))
    bearer = {"Authorization": f"Bearer {token()}"}
    client = await connect(session, gw.url("/events/news"), headers=bearer)
    await upstream.wait_open("news")
    await upstream.publish("news", *events("news", 1, 1))
    assert await client.wait_events(1) == events("news", 1, 1)
    assert await status_of(session, gw.url("/events/prices.acme"), headers=bearer) == 200
    # A token for news and prices.* used on sports: 403, and no upstream for sports.
    assert await status_of(session, gw.url("/events/sports"), headers=bearer) == 403
    assert "sports" not in {r.match_info["topic"] for r in upstream.connections}
    assert gw.metric("sse_gateway_requests_rejected_total", reason="auth") == 1
    client.close()


def good(secret: str = SECRET, **claims: Any) -> str:
    """A token the audience/issuer route accepts unless a claim is overridden."""
    return token(secret, **{"aud": "sse", "iss": "https://id.example", **claims})


@pytest.mark.parametrize(
    ("case", "make", "status"),
    [
        ("no token", lambda: None, 401),
        ("valid", lambda: good(), 200),
        ("expired", lambda: good(exp=time.time() - 60), 401),
        ("not yet valid", lambda: good(nbf=time.time() + 600), 401),
        ("wrong signature", lambda: good(secret="another-secret-that-is-long-enough-xx"), 401),
        ("wrong audience", lambda: good(aud="someone-else"), 403),
        ("wrong issuer", lambda: good(iss="https://evil.example"), 403),
        ("garbage", lambda: "not.a.jwt", 401),
        (
            "no exp",
            lambda: jwt.encode(
                {"aud": "sse", "iss": "https://id.example", "topics": ["news"]}, SECRET
            ),
            401,
        ),
        (
            "alg none",
            lambda: jwt.encode(
                {"exp": time.time() + 60, "topics": ["news"]},
                None,  # type: ignore[arg-type]  # PyJWT takes None for "none"
                algorithm="none",
            ),
            401,
        ),
        ("string claim", lambda: good(topics="news sports"), 200),
        ("pattern claim", lambda: good(topics=["n*"]), 200),
        ("no topics", lambda: good(topics=[]), 403),
    ],
)
async def test_jwt_rules(
    case: str,
    make: Any,
    status: int,
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
) -> None:
    gw = await make_gateway(jwt_route(upstream, audience="sse", issuer="https://id.example"))
    value = make()
    headers = {} if value is None else {"Authorization": f"Bearer {value}"}
    assert await status_of(session, gw.url("/events/news"), headers=headers) == status, case
    if status != 200:
        assert upstream.connections == []


@pytest.mark.parametrize(
    ("case", "route", "claims", "status"),
    [
        # A token minted for another service must not open this one's streams: a route that
        # names no audience refuses any token that names one, unless the route opts out.
        ("aud on a route without audience", {}, {"aud": "other-service"}, 403),
        ("aud list on a route without audience", {}, {"aud": ["other-service"]}, 403),
        ("opted out", {"allow_any_audience": True}, {"aud": "other-service"}, 200),
        ("no aud on a route without audience", {}, {}, 200),
        ("matching audience", {"audience": "a"}, {"aud": "a"}, 200),
        ("one of its audiences", {"audience": "a"}, {"aud": ["b", "a"]}, 200),
        ("other audience", {"audience": "a"}, {"aud": "b"}, 403),
        ("no aud on a route with audience", {"audience": "a"}, {}, 401),
    ],
)
async def test_a_token_for_another_audience_is_refused(
    case: str,
    route: dict[str, Any],
    claims: dict[str, Any],
    status: int,
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
) -> None:
    gw = await make_gateway(jwt_route(upstream, **route))
    bearer = {"Authorization": f"Bearer {token(**claims)}"}
    assert await status_of(session, gw.url("/events/news"), headers=bearer) == status, case
    if status != 200:
        assert upstream.connections == []


def test_allow_any_audience_contradicts_a_named_audience() -> None:
    doc = {
        "routes": [
            {
                "path": "/e/{t}",
                "upstream": "http://u/{t}",
                "auth": {"type": "jwt", "key": "k", "audience": "a", "allow_any_audience": True},
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        from_document(doc, {})
    assert info.value.problems == [
        "routes[0].auth.allow_any_audience: the route names an audience; "
        "remove one of audience and allow_any_audience"
    ]


async def test_token_from_cookie_or_opt_in_query_parameter(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(jwt_route(upstream, cookie="token", query_param="access_token"))
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": f"token={token()}"})
        == 200
    )
    assert await status_of(session, gw.url(f"/events/news?access_token={token()}")) == 200
    plain = await make_gateway(jwt_route(upstream))  # query tokens are opt-in
    assert await status_of(session, plain.url(f"/events/news?access_token={token()}")) == 401


async def test_stream_ends_when_its_token_expires_with_a_retry_hint(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(jwt_route(upstream, leeway_seconds=0))
    short = token(exp=time.time() + 1.0)
    client = await connect(
        session, gw.url("/events/news"), headers={"Authorization": f"Bearer {short}"}
    )
    await client.wait_end(timeout=10)
    assert bytes(client.raw).endswith(b"\n")  # the goodbye's retry line, its block left open
    assert bytes(client.raw).count(b"retry: ") == 2  # the preamble and the goodbye
    assert gw.metric("sse_gateway_connections_closed_total", route="r", outcome="auth") == 1


async def test_rs256_and_es256_keys_from_a_jwks_fetched_once_and_cached(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, private, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
        keys.append(jwk | {"kid": kid, "alg": alg, "use": "sig"})
    fetches = 0

    async def jwks(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response({"keys": keys})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner, port = await serve_app(app)
    try:
        gw = await make_gateway(
            route_doc(
                upstream,
                auth={
                    "type": "jwt",
                    "algorithms": ["RS256", "ES256"],
                    "jwks_url": f"http://127.0.0.1:{port}/jwks",
                },
            )
        )
        body = {"exp": time.time() + 300, "topics": ["news"]}
        for kid, private, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
            signed = jwt.encode(body, private, algorithm=alg, headers={"kid": kid})
            headers = {"Authorization": f"Bearer {signed}"}
            assert await status_of(session, gw.url("/events/news"), headers=headers) == 200, alg
        forged = jwt.encode(
            body,
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256",
            headers={"kid": "r1"},
        )
        assert (
            await status_of(
                session, gw.url("/events/news"), headers={"Authorization": f"Bearer {forged}"}
            )
            == 401
        )
        assert fetches == 1  # cached; an unknown kid refreshes at most every 10 s
    finally:
        await runner.cleanup()


def test_auth_config_problems_are_named() -> None:
    def problems(auth: dict[str, Any]) -> list[str]:
        doc = {"routes": [{"path": "/e/{t}", "upstream": "http://u/{t}", "auth": auth}]}
        with pytest.raises(ConfigError) as info:
            from_document(doc, {})
        return info.value.problems

    assert problems({"type": "jwt"}) == [
        "routes[0].auth.key: a jwt route needs a key or a jwks_url"
    ]
    assert problems({"type": "jwt", "key": "k", "algorithms": ["none"]})[0].startswith(
        "routes[0].auth.algorithms: 'none' is not one of"
    )
    assert problems({"type": "jwt", "key": {"env": "NOPE"}}) == [
        "routes[0].auth.key: environment variable NOPE is not set"
    ]
    assert problems({"type": "forward"}) == [
        "routes[0].auth.url: a forward route needs the auth backend's url"
    ]
    assert problems({"type": "magic"})[0] == "routes[0].auth.type: one of none, jwt, forward"
    # Keys and credentials do not cross a network in clear unless the operator says so.
    assert problems({"type": "jwt", "jwks_url": "http://id.example/jwks.json"}) == [
        "routes[0].auth.jwks_url: plain http to 'id.example' sends credentials or keys in "
        "clear: use https, or set allow_plain_http = true for a trusted network"
    ]
    assert problems({"type": "forward", "url": "http://10.0.0.7:9000/auth"}) == [
        "routes[0].auth.url: plain http to '10.0.0.7' sends credentials or keys in "
        "clear: use https, or set allow_plain_http = true for a trusted network"
    ]


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "jwt", "jwks_url": "https://id.example/jwks.json"},
        {"type": "jwt", "jwks_url": "http://127.0.0.1:9000/jwks.json"},
        {"type": "forward", "url": "http://localhost:9000/auth"},
        {"type": "forward", "url": "http://[::1]:9000/auth"},
        {"type": "forward", "url": "http://auth.internal/auth", "allow_plain_http": True},
        {"type": "forward", "url": "https://auth.example/auth", "allow_plain_http": False},
    ],
)
def test_auth_urls_over_https_loopback_or_an_explicitly_trusted_network_load(
    auth: dict[str, Any],
) -> None:
    doc = {"routes": [{"path": "/e/{t}", "upstream": "http://u/{t}", "auth": auth}]}
    route = from_document(doc, {}).routes[0]
    assert route.auth.type == auth["type"]
    assert "s3cret" not in repr(
        from_document(
            {
                "routes": [
                    {
                        "path": "/e/{t}",
                        "upstream": "http://u/{t}",
                        "auth": {"type": "jwt", "key": "s3cret"},
                    }
                ]
            },
            {},
        )
    )


# --- forward auth ------------------------------------------------------------------------


class AuthBackend:
    """A real auth backend: allows Cookie session=good, counts calls, can stall or vanish."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.stall = asyncio.Event()
        self.stalling = False
        self.changes = Changes()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/auth", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.headers))
        self.changes.notify()
        if self.stalling:
            await self.stall.wait()
        cookie = request.headers.get("Cookie", "")
        if "session=good" in cookie:
            return web.Response(text="ok")
        if "session=" in cookie:
            return web.Response(status=403)
        return web.Response(status=401)


@pytest.fixture
async def auth_backend() -> AsyncIterator[AuthBackend]:
    backend = AuthBackend()
    await backend.start()
    yield backend
    backend.stall.set()
    await backend.stop()


def forward_route(upstream: Upstream, backend: AuthBackend, **auth: Any) -> dict[str, Any]:
    url = f"http://127.0.0.1:{backend.port}/auth"
    return route_doc(upstream, auth={"type": "forward", "url": url, **auth})


async def test_a_reload_during_the_auth_check_ends_the_stream_instead_of_joining_the_old_route(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    route = forward_route(upstream, auth_backend)
    gw = await make_gateway(route)
    auth_backend.stalling = True
    pending = asyncio.create_task(
        connect(session, gw.url("/events/t"), headers={"Cookie": "session=good"})
    )
    await auth_backend.changes.until(lambda: len(auth_backend.calls) == 1)
    # SIGHUP while the request waits on its auth check: the route changes.
    doc = {
        "routes": [dict(route, heartbeat_seconds=7)],
        "limits": {"max_subscribers_per_client": 0, "max_connections_per_second": 0},
        "metrics": {"listen": ""},
    }
    reload(gw.app, from_document(doc, {}))
    auth_backend.stall.set()
    client = await pending
    # The stream resolved under the old table ends after its preamble (the client comes
    # back under the new one); no topic of the old route is opened.
    await client.wait_end()
    assert gw.hub.topics == {}
    assert upstream.connections == []


async def test_forward_auth_allows_denies_and_passes_the_status_through(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    gw = await make_gateway(forward_route(upstream, auth_backend))
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": "session=good"}) == 200
    )
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": "session=bad"}) == 403
    )
    assert await status_of(session, gw.url("/events/news")) == 401
    call = auth_backend.calls[0]
    assert call["Cookie"] == "session=good"
    assert call["X-Gateway-Topic"] == "news"
    assert call["X-Gateway-Route"] == "r"
    assert [r.match_info["topic"] for r in upstream.connections] == ["news"]


async def test_forward_auth_is_cached_and_shared_by_subscribers_with_the_same_cookie(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    gw = await make_gateway(forward_route(upstream, auth_backend, cache_seconds=60))
    clients = await asyncio.gather(
        *(
            connect(session, gw.url("/events/news"), headers={"Cookie": "session=good"})
            for _ in range(20)
        )
    )
    assert len(auth_backend.calls) == 1  # 20 subscribers, one cookie: one call
    await status_of(session, gw.url("/events/other"), headers={"Cookie": "session=good"})
    assert len(auth_backend.calls) == 2  # a decision is per topic
    for client in clients:
        client.close()


async def test_forward_auth_timeout_and_backend_down_fail_closed_with_503(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    gw = await make_gateway(forward_route(upstream, auth_backend, timeout_seconds=0.2))
    auth_backend.stalling = True
    async with session.get(gw.url("/events/news"), headers={"Cookie": "session=good"}) as resp:
        assert resp.status == 503
        assert "Retry-After" in resp.headers
    auth_backend.stalling = False
    auth_backend.stall.set()
    await auth_backend.stop()  # down: connection refused
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": "session=good"}) == 503
    )
    assert gw.metric("sse_gateway_requests_rejected_total", reason="auth_unavailable") == 2
    assert upstream.connections == []
    open_gw = await make_gateway(forward_route(upstream, auth_backend, fail_open=True))
    assert await status_of(session, open_gw.url("/events/news")) == 200  # opted in to fail open


# --- direct mode ---------------------------------------------------------------------------


async def test_direct_mode_gives_each_client_its_own_upstream_with_its_own_cookie(
    make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    seen: list[CIMultiDict[str]] = []
    changes = Changes()

    async def per_user(request: web.Request) -> web.StreamResponse:
        """A per-user backend: each stream carries its own user's events and then ends."""
        seen.append(CIMultiDict(request.headers))  # header names are case-insensitive
        changes.notify()
        user = request.cookies.get("user", "nobody")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = int(request.headers.get("Last-Event-ID", "0"))
        for i in range(start + 1, start + 4):
            await resp.write(f"id: {i}\ndata: for {user} {i}\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_get("/stream/{topic}", per_user)
    runner, port = await serve_app(app)
    try:
        route = {
            "name": "inbox",
            "path": "/inbox/{topic}",
            "upstream": f"http://127.0.0.1:{port}/stream/{{topic}}",
            "mode": "direct",
            "forward_headers": ["Cookie", "X-Request-Id"],
            "retry_ms": 3000,
            "retry_max_ms": 3000,
        }
        # The test client, 127.0.0.1, stands for a trusted load balancer too.
        gw = await make_gateway(route, server={"trusted_proxies": ["127.0.0.0/8"]})
        alice = await connect(
            session,
            gw.url("/inbox/me"),
            headers={"Cookie": "user=alice", "X-Secret": "no", "X-Request-Id": "r1"},
        )
        bob = await connect(
            session,
            gw.url("/inbox/me"),
            headers={
                "Cookie": "user=bob",
                "Last-Event-ID": "7",
                "X-Forwarded-For": "203.0.113.5, 198.51.100.4",
            },
        )
        await alice.wait_end()  # the upstream ended: so does the client's stream
        await bob.wait_end()
        assert [e.data for e in alice.events] == [f"for alice {i}" for i in (1, 2, 3)]
        assert [e.data for e in bob.events] == [f"for bob {i}" for i in (8, 9, 10)]
        by_user = {h["Cookie"]: h for h in seen}
        assert set(by_user) == {"user=alice", "user=bob"}
        alice_headers, bob_headers = by_user["user=alice"], by_user["user=bob"]
        assert alice_headers["X-Request-Id"] == "r1"  # allow-listed
        assert "X-Secret" not in alice_headers  # not allow-listed
        assert "Last-Event-ID" not in alice_headers
        assert bob_headers["Last-Event-ID"] == "7"  # passed through
        assert alice_headers["X-Forwarded-For"] == "127.0.0.1"
        assert alice_headers["X-Forwarded-Proto"] == "http"
        assert alice_headers["Forwarded"].startswith('for="127.0.0.1";proto=http')
        # Behind the trusted proxy, the client it names; the client's own claim is dropped.
        assert bob_headers["X-Forwarded-For"] == "198.51.100.4"
        assert bob_headers["Forwarded"].startswith('for="198.51.100.4";proto=http')
        assert len(seen) == 2  # one upstream request per client, none shared
        assert (
            gw.metric("sse_gateway_connections_closed_total", route="inbox", outcome="normal") == 2
        )
        alice.close()
        bob.close()
    finally:
        await runner.cleanup()


def test_hop_by_hop_headers_cannot_be_forwarded() -> None:
    doc = {
        "routes": [
            {
                "path": "/e/{t}",
                "upstream": "http://u/{t}",
                "mode": "direct",
                "forward_headers": ["Connection"],
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        from_document(doc, {})
    assert info.value.problems == [
        "routes[0].forward_headers: 'Connection' is not forwarded: the gateway owns it"
    ]


# --- from the security review ------------------------------------------------------------


async def test_a_crafted_host_header_cannot_add_forwarded_elements(
    upstream: Upstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(route_doc(upstream, mode="direct", forward_headers=["Cookie"]))
    evil = 'x", for=6.6.6.6;proto=https;host="bank.example'
    request = f"GET /events/t HTTP/1.1\r\nHost: {evil}\r\n\r\n".encode()
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request)
    await upstream.wait_connections(1)
    headers = upstream.connections[0].headers
    assert headers["Forwarded"] == 'for="127.0.0.1";proto=http'
    assert "X-Forwarded-Host" not in headers
    assert "6.6.6.6" not in str(dict(headers))
    writer.close()


async def test_allow_listed_query_parameters_are_part_of_the_authorized_topic(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    gw = await make_gateway(forward_route(upstream, auth_backend) | {"query": ["room"]})
    cookie = {"Cookie": "session=good"}
    assert await status_of(session, gw.url("/events/news?room=public"), headers=cookie) == 200
    assert await status_of(session, gw.url("/events/news?room=secret"), headers=cookie) == 200
    topics = [call["X-Gateway-Topic"] for call in auth_backend.calls]
    assert topics == ["news?room=public", "news?room=secret"]  # two decisions, not one


async def test_a_client_leaving_does_not_cancel_the_shared_auth_answer(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    gw = await make_gateway(forward_route(upstream, auth_backend, timeout_seconds=5))
    auth_backend.stalling = True
    cookie = {"Cookie": "session=good"}
    leader = asyncio.create_task(status_of(session, gw.url("/events/news"), headers=cookie))
    await auth_backend.changes.until(lambda: len(auth_backend.calls) == 1)
    follower = asyncio.create_task(status_of(session, gw.url("/events/news"), headers=cookie))
    leader.cancel()  # the first client hangs up while the check is in flight
    await asyncio.gather(leader, return_exceptions=True)
    auth_backend.stall.set()
    assert await asyncio.wait_for(follower, 5) == 200
    assert len(auth_backend.calls) == 1


async def test_fail_open_answers_are_not_remembered(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    auth_backend: AuthBackend,
) -> None:
    port = auth_backend.port
    await auth_backend.stop()
    gw = await make_gateway(
        forward_route(upstream, auth_backend, fail_open=True, cache_seconds=300)
    )
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": "session=bad"}) == 200
    )
    auth_backend.port = port
    await auth_backend.start()  # back, and it denies this cookie
    assert (
        await status_of(session, gw.url("/events/news"), headers={"Cookie": "session=bad"}) == 403
    )


async def test_unknown_kids_share_one_jwks_fetch(
    upstream: Upstream, make_gateway: GatewayFactory, session: aiohttp.ClientSession
) -> None:
    fetches = 0

    async def jwks(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner, port = await serve_app(app)
    try:
        auth = {"type": "jwt", "algorithms": ["HS256"], "jwks_url": f"http://127.0.0.1:{port}/jwks"}
        gw = await make_gateway(route_doc(upstream, auth=auth))
        junk = [
            jwt.encode({"exp": time.time() + 60}, "x" * 32, headers={"kid": f"junk{i}"})
            for i in range(30)
        ]
        statuses = await asyncio.gather(
            *(
                status_of(session, gw.url("/events/news"), headers={"Authorization": f"Bearer {t}"})
                for t in junk
            )
        )
        assert set(statuses) == {401}
        assert fetches == 1  # one shared fetch, then the refresh interval holds
    finally:
        await runner.cleanup()

"""Auth input the client or an auth backend controls: a clear status and a log line, never a 500.

Real sockets: a real gateway, a real JWKS server, a real (or raw-TCP) forward-auth
backend. The token verifier and the JWKS reader are also fuzzed as pure functions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway.app import make_app, make_runner
from gateway.config import from_document
from gateway.config.auth import JwtConfig
from gateway.core.route import RouteTable
from gateway.edge import auth
from gateway.edge.head import RequestHead
from gateway.edge.jwks import JwksError, usable_keys
from gateway.errors import BadRequest, GatewayError
from gateway.metrics import Metrics

from .conftest import Gateway, route_doc
from .support import FakeClock, Upstream, serve_app

SECRET = "test-secret-that-is-long-enough-for-hs256"

ClockedFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def clocked_gateway(clock: FakeClock) -> AsyncIterator[ClockedFactory]:
    """Like `make_gateway`, on the test's virtual clock (JWKS refresh intervals)."""
    runners: list[web.AppRunner] = []

    async def start(*routes: dict[str, Any]) -> Gateway:
        doc = {
            "routes": list(routes),
            "limits": {"max_subscribers_per_client": 0, "max_connections_per_second": 0},
            "server": {"shutdown_timeout_seconds": 2},
            "metrics": {"listen": ""},
        }
        config = from_document(doc, {})
        registry = CollectorRegistry()
        app = make_app(config, metrics=Metrics(registry), clock=clock)
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Gateway(app, runner, port, config, registry)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


async def status_of(session: aiohttp.ClientSession, url: str | URL, **kwargs: Any) -> int:
    async with session.get(url, **kwargs) as resp:
        return resp.status


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged with a traceback (aiohttp logs one for every unhandled error)."""
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert tracebacks == []


def rejected(caplog: pytest.LogCaptureFixture, status: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.access" and f"status={status}" in r.getMessage()
    ]


def warnings_from_auth(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.edge.auth" and r.levelno >= logging.WARNING
    ]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: object, payload: object, secret: str = SECRET) -> str:
    """An HS256 token around any JSON header and payload, signed correctly (PyJWT refuses to
    make most of these)."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


# --- forward auth: the topic travels in a header -------------------------------------------


class AuthBackend:
    """Allows everything and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.headers))
        return web.Response(text="ok")


@pytest.fixture
async def backend() -> AsyncIterator[tuple[AuthBackend, str]]:
    backend = AuthBackend()
    app = web.Application()
    app.router.add_get("/auth", backend.handle)
    runner, port = await serve_app(app)
    yield backend, f"http://127.0.0.1:{port}/auth"
    await runner.cleanup()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("a%0Ab", 400),  # LF: aiohttp's client refuses the header (it was a 500)
        ("a%0Db", 400),  # CR
        ("a%00b", 400),  # NUL
        ("a%01b", 400),  # any other control character is no header value either
        ("a%7Fb", 400),
        ("%20news", 400),  # the backend would trim it and decide on "news"
        ("news%09", 400),
        ("caf%C3%A9%20au%20lait", 200),  # inner spaces and UTF-8 travel fine
    ],
)
async def test_a_topic_that_cannot_be_a_header_value_gets_400_not_a_traceback(
    raw: str,
    status: int,
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    session: aiohttp.ClientSession,
    backend: tuple[AuthBackend, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server, url = backend
    route = route_doc(upstream, params={"topic": r"[\s\S]+"}, auth={"type": "forward", "url": url})
    gw = await clocked_gateway(route)
    target = URL(gw.url(f"/events/{raw}"), encoded=True)
    assert await status_of(session, target) == status
    no_traceback(caplog)
    if status == 400:
        assert server.calls == []
        assert upstream.connections == []
        assert len(rejected(caplog, 400)) == 1


def Head(headers: dict[str, str] | list[tuple[str, str]]) -> RequestHead:
    """A request head as a listener other than aiohttp's would build it."""
    return RequestHead(
        method="GET",
        raw_path="/events/news",
        query=(),
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        peer="127.0.0.1",
        tls=False,
        scheme="http",
        host="x",
    )


@pytest.mark.parametrize("value", ["a\x00b", "a\nb", "a\x01b"])
async def test_a_forwarded_header_no_header_can_carry_is_refused_before_the_backend(
    value: str, upstream: Upstream, backend: tuple[AuthBackend, str]
) -> None:
    """aiohttp's parser refuses these in front; a head from another listener may not."""
    server, url = backend
    config = from_document(
        {"routes": [route_doc(upstream, auth={"type": "forward", "url": url})]}, {}
    )
    target = RouteTable(config.routes).resolve("/events/news", ())
    async with aiohttp.ClientSession() as session:
        authorizer = auth.Authorizer(session, FakeClock())
        with pytest.raises(BadRequest):
            await authorizer.check(Head({"Cookie": value}), target)
        assert await authorizer.check(Head({"Cookie": "a=b"}), target) == auth.ALLOW
    assert [call["Cookie"] for call in server.calls] == ["a=b"]


class RawBackend:
    """An auth backend that answers with fixed bytes, whatever it is asked."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/auth"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize(
    ("case", "answer", "status"),
    [
        ("not http", b"hello\r\n\r\n", 503),
        ("no answer", b"", 503),
        ("huge header", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200_000 + b"\r\n\r\n", 503),
        ("bad header", b"HTTP/1.1 200 OK\r\nX-\x00: y\r\nContent-Length: 0\r\n\r\n", 503),
        ("odd status", b"HTTP/1.1 299 Odd\r\nContent-Length: 0\r\n\r\n", 200),
        ("unknown status", b"HTTP/1.1 999 What\r\nContent-Length: 0\r\n\r\n", 503),
        ("redirect", b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n", 503),
        (
            "huge body",
            b"HTTP/1.1 403 No\r\nContent-Length: 50000000\r\n\r\n" + b"x" * 100_000,
            403,
        ),
    ],
)
async def test_whatever_a_forward_auth_backend_answers_is_a_status_not_a_traceback(
    case: str,
    answer: bytes,
    status: int,
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    raw = RawBackend(answer)
    url = await raw.start()
    try:
        gw = await clocked_gateway(route_doc(upstream, auth={"type": "forward", "url": url}))
        assert await status_of(session, gw.url("/events/news")) == status, case
        no_traceback(caplog)
        if status == 503:
            assert len(warnings_from_auth(caplog)) == 1, case
    finally:
        await raw.stop()


# --- JWKS: the document is the identity provider's ---------------------------------------


class Jwks:
    """A JWKS endpoint whose body the test sets."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.fetches = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(body=self.body, content_type="application/json")


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[Jwks, str]]:
    server = Jwks()
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner, port = await serve_app(app)
    yield server, f"http://127.0.0.1:{port}/jwks"
    await runner.cleanup()


GOOD_KEY = {"kty": "oct", "k": b64(SECRET.encode()), "kid": "k1", "alg": "HS256"}


@pytest.mark.parametrize(
    ("case", "document"),
    [
        ("a list", b"[]"),
        ("a string", b'"keys"'),
        ("null", b"null"),
        ("keys not a list", b'{"keys": {"kid": "k1"}}'),
        ("keys a string", b'{"keys": "k1"}'),
        ("no usable key", json.dumps({"keys": [{"kty": "RSA", "n": 1, "e": 2}]}).encode()),
        ("alg not a string", json.dumps({"keys": [dict(GOOD_KEY, alg=["HS256"])]}).encode()),
        ("kty not a string", json.dumps({"keys": [dict(GOOD_KEY, kty=["oct"])]}).encode()),
        ("a key without its material", b'{"keys": [{"kty": "oct", "kid": "k1"}]}'),
        ("kid not a string", json.dumps({"keys": [dict(GOOD_KEY, kid=["k1"])]}).encode()),
        ("not json", b"<html>oops</html>"),
        ("not utf-8", b"\xff\xfe{"),
        ("nested too deep", b"[" * 100_000 + b"]" * 100_000),
        ("huge", b'{"keys": [], "pad": "' + b"x" * 3_000_000 + b'"}'),
    ],
)
async def test_a_bad_jwks_document_is_503_with_a_log_line_and_a_good_one_recovers(
    case: str,
    document: bytes,
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    clock: FakeClock,
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server, url = jwks
    server.body = document
    gw = await clocked_gateway(
        route_doc(upstream, auth={"type": "jwt", "algorithms": ["HS256"], "jwks_url": url})
    )
    good = jwt.encode({"exp": time.time() + 300, "topics": ["news"]}, SECRET, headers={"kid": "k1"})
    bearer = {"Authorization": f"Bearer {good}"}
    assert await status_of(session, gw.url("/events/news"), headers=bearer) == 503, case
    no_traceback(caplog)
    assert len(warnings_from_auth(caplog)) == 1, case
    assert server.fetches == 1
    # The identity provider fixes its document: after the refresh interval, tokens verify.
    server.body = json.dumps({"keys": [GOOD_KEY]}).encode()
    clock.advance(auth.JWKS_MIN_REFRESH_SECONDS + 1)
    assert await status_of(session, gw.url("/events/news"), headers=bearer) == 200, case


async def test_a_bad_key_beside_good_ones_is_skipped(
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, url = jwks
    bad = [{"kty": "RSA", "n": 1}, dict(GOOD_KEY, alg=["x"]), "junk", dict(GOOD_KEY, kid=7)]
    server.body = json.dumps({"keys": [*bad, GOOD_KEY]}).encode()
    gw = await clocked_gateway(
        route_doc(upstream, auth={"type": "jwt", "algorithms": ["HS256"], "jwks_url": url})
    )
    good = jwt.encode({"exp": time.time() + 300, "topics": ["news"]}, SECRET, headers={"kid": "k1"})
    bearer = {"Authorization": f"Bearer {good}"}
    assert await status_of(session, gw.url("/events/news"), headers=bearer) == 200
    no_traceback(caplog)


# --- tokens: every part of one is the client's --------------------------------------------

NOW = time.time()


def odd(header: object, **claims: Any) -> Callable[[], str]:
    """A correctly signed token with this header, for `news` unless a claim says otherwise."""
    return lambda: signed(header, {"exp": NOW + 300, "topics": ["news"], **claims})


@pytest.mark.parametrize(
    ("case", "make", "status"),
    [
        ("kid a list", odd({"alg": "HS256", "kid": ["k1"]}), 401),
        ("kid an object", odd({"alg": "HS256", "kid": {"k": 1}}), 401),
        ("kid a number", odd({"alg": "HS256", "kid": 1}), 401),
        ("header a list", lambda: signed(["HS256"], {"exp": NOW + 300}), 401),
        ("alg a list", odd({"alg": ["HS256"], "kid": "k1"}), 401),
        ("alg none", odd({"alg": "none", "kid": "k1"}), 401),
        ("payload a list", lambda: signed({"alg": "HS256", "kid": "k1"}, [1]), 401),
        ("exp a string", odd({"alg": "HS256", "kid": "k1"}, exp="soon"), 401),
        ("exp a list", odd({"alg": "HS256", "kid": "k1"}, exp=[1]), 401),
        ("exp NaN", odd({"alg": "HS256", "kid": "k1"}, exp=float("nan")), 401),
        ("exp inf", odd({"alg": "HS256", "kid": "k1"}, exp=float("inf")), 401),
        # Signed by the issuer, just never expiring: served, with a grant of bounded length.
        ("exp no float holds", odd({"alg": "HS256", "kid": "k1"}, exp=10**400), 200),
        ("non-ascii", lambda: "é.é.é", 401),
        ("five parts", lambda: "a.b.c.d.e", 401),
    ],
)
async def test_a_token_with_odd_parts_is_refused_not_a_traceback(
    case: str,
    make: Callable[[], str],
    status: int,
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    session: aiohttp.ClientSession,
    jwks: tuple[Jwks, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server, url = jwks
    server.body = json.dumps({"keys": [GOOD_KEY]}).encode()
    for auth_table in (
        {"type": "jwt", "algorithms": ["HS256"], "jwks_url": url},
        {"type": "jwt", "algorithms": ["HS256"], "key": SECRET},
    ):
        gw = await clocked_gateway(route_doc(upstream, auth=auth_table))
        bearer = {"Authorization": f"Bearer {make()}"}
        assert await status_of(session, gw.url("/events/news"), headers=bearer) == status, case
        no_traceback(caplog)
        if status == 401:
            assert len(rejected(caplog, 401)) == 1
            caplog.clear()
    if status != 200:
        assert upstream.connections == []


async def test_a_token_header_with_bytes_that_are_not_utf8_is_401(
    upstream: Upstream,
    clocked_gateway: ClockedFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp hands such bytes on as surrogate escapes, which PyJWT cannot encode."""
    caplog.set_level(logging.INFO)
    gw = await clocked_gateway(
        route_doc(upstream, auth={"type": "jwt", "algorithms": ["HS256"], "key": SECRET})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /events/news HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\xff.b.c\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readline()
    writer.close()
    assert head.split()[1] == b"401"
    no_traceback(caplog)


# --- fuzz: only the gateway's own errors come out --------------------------------------------

JWT_CONFIG = JwtConfig(
    algorithms=("HS256",),
    key=SECRET,
    jwks_url=None,
    jwks_cache_seconds=300.0,
    audience=None,
    allow_any_audience=False,
    issuer=None,
    leeway_seconds=5.0,
    topics_claim="topics",
    cookie=None,
    query_param=None,
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "exp": JSON | st.floats(min_value=NOW, max_value=1e300),
        "nbf": JSON,
        "iat": JSON,
        "aud": JSON,
        "iss": JSON,
        "topics": JSON | st.just(["news"]),
    },
)
HEADERS = st.fixed_dictionaries(
    {"alg": st.just("HS256") | JSON}, optional={"kid": JSON, "b64": JSON, "crit": JSON}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.characters(exclude_categories=()), max_size=60))
def test_fuzz_any_token_string_gives_claims_or_a_gateway_error(text: str) -> None:
    try:
        claims = auth.verify_token(text, SECRET, JWT_CONFIG)
    except GatewayError:
        return
    assert isinstance(claims, dict)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADERS | JSON, CLAIMS | JSON)
def test_fuzz_a_correctly_signed_token_of_any_shape_gives_a_grant_or_a_gateway_error(
    header: Any, payload: Any
) -> None:
    token = signed(header, payload)
    try:
        auth.token_kid(token)
        claims = auth.verify_token(token, SECRET, JWT_CONFIG)
        seconds = auth.seconds_left(claims, JWT_CONFIG, time.time())
    except GatewayError:
        return
    assert seconds >= 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["keys", "x"]), JSON) | JSON)
def test_fuzz_any_jwks_document_gives_keys_or_the_jwks_error(document: Any) -> None:
    try:
        keys = usable_keys(document)
    except JwksError:
        return
    assert all(isinstance(kid, str) for kid in keys)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {"kty": st.sampled_from(["oct", "RSA", "EC", "OKP"]) | JSON},
            optional={
                "alg": st.sampled_from(["HS256", "RS256", "ES256", "EdDSA"]) | JSON,
                "kid": JSON,
                "k": JSON | st.just(b64(b"secret")),
                "n": JSON,
                "e": JSON,
                "crv": st.sampled_from(["P-256", "Ed25519"]) | JSON,
                "x": JSON,
                "y": JSON,
                "d": JSON,
            },
        ),
        max_size=4,
    )
)
def test_fuzz_any_jwks_keys_give_keys_or_the_jwks_error(keys: list[Any]) -> None:
    try:
        usable = usable_keys({"keys": keys})
    except JwksError:
        return
    assert all(isinstance(k, jwt.PyJWK) for k in usable.values())


async def test_repeated_headers_reach_forward_auth_whole_and_are_cached_apart(
    upstream: Upstream, backend: tuple[AuthBackend, str]
) -> None:
    """HTTP/2 sends cookies in crumbs: the backend must see every crumb, and two users who
    share a first crumb must not share a cached decision."""
    server, url = backend
    config = from_document(
        {"routes": [route_doc(upstream, auth={"type": "forward", "url": url})]}, {}
    )
    target = RouteTable(config.routes).resolve("/events/news", ())
    async with aiohttp.ClientSession() as session:
        authorizer = auth.Authorizer(session, FakeClock())
        await authorizer.check(Head([("Cookie", "theme=dark"), ("Cookie", "sid=alice")]), target)
        await authorizer.check(Head([("Cookie", "theme=dark"), ("Cookie", "sid=bob")]), target)
    assert [call["Cookie"] for call in server.calls] == [
        "theme=dark; sid=alice",
        "theme=dark; sid=bob",
    ]

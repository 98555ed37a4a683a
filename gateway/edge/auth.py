"""Who may subscribe: JWT and forward-auth checks, made before a client joins a topic.

In the shared mode one upstream stream serves many people, so the gateway
itself decides (DESIGN.md, "Security model"). A denial ends the request with
401 or 403 and a short body before any topic or upstream is touched; an auth
backend that cannot answer fails closed with 503 unless the route opts out.
No token, cookie or credential value is ever logged or kept in plain form:
forward-auth decisions are cached under a hash of the forwarded headers.

- `jwt`: the token comes from `Authorization: Bearer`, a named cookie, or (opt
  in) a query parameter. PyJWT checks the signature (a configured key, or a
  JWKS fetched over HTTP and cached), `exp`, `nbf`, `aud` and `iss`; a claim
  lists the topics (or `fnmatch` patterns) the token may subscribe to. The
  grant expires with the token, and the stream is ended then (with a retry
  hint) so the client comes back with a fresh token and its Last-Event-ID.
- `forward`: a GET to the configured URL carrying the client's allow-listed
  headers and the topic (`X-Gateway-Topic`); 2xx allows, 401/403 deny with
  that status. Decisions are cached per (route, topic, credential) for
  `cache_seconds`, and concurrent identical checks share one request.

Everything a client or an auth backend sends ends as a `GatewayError`, never a
traceback: a token that is not a compact JWS or whose header and claims have odd
types (401), a topic or header that cannot travel in a header to the forward-auth
backend (400), a JWKS answer that is not a usable key set, oversize or nested too
deep, or a forward-auth answer that is not a decision (503, one warning line).

A topic's name for authorization is its path parameters joined with "/"
(`news` for `/events/{topic}`, `acme/general` for `/teams/{team}/{channel}`),
followed by the route's allow-listed query parameters when present
(`news?room=public`), since those choose the stream too.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
import jwt

from ..config.auth import ForwardAuthConfig, JwtConfig
from ..core.route import Target
from ..errors import AuthDenied, AuthUnavailable, BadRequest, Unauthorized
from ..timing import Clock
from .jwks import JwksError, fetch_keys

log = logging.getLogger(__name__)

# An unknown kid (or a failed fetch) triggers a refresh at most this often: a junk-kid
# flood costs one fetch per interval, not one per request.
JWKS_MIN_REFRESH_SECONDS = 10.0
# Forward-auth decisions kept: one per live (route, topic, credential); oldest evicted.
FORWARD_CACHE_ENTRIES = 10_000
# A grant is cut to this: a token that claims to live for centuries (or for 10**400
# seconds, which no float holds) still gets a stream, ended and renewed like any other.
MAX_GRANT_SECONDS = 366 * 86400.0

# A compact JWS is base64url segments and dots; anything else (non-ASCII, the surrogate
# escapes aiohttp makes of bytes that are not UTF-8) is refused before PyJWT sees it.
_TOKEN = re.compile(r"[A-Za-z0-9_.=-]+")
# What can travel as a header value unchanged: no control character (HTAB inside only) and
# no space at either end, which a backend would trim and then decide on another topic.
_HEADER_VALUE = re.compile(
    r"(?:[^\x00-\x20\x7f]"  # first: neither space nor control character
    r"(?:[^\x00-\x08\x0a-\x1f\x7f]*"  # inside: spaces and HTAB too
    r"[^\x00-\x20\x7f])?)?"  # last: as the first; or the value is empty
)


class AuthRequest(Protocol):
    """What auth reads of a request: `head.RequestHead` is one, whatever the listener.

    Only these, so every listener's requests are checked the same way.
    """

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def path(self) -> str:
        """The raw path without its query string (which may carry a token)."""
        ...

    def joined(self, name: str) -> str | None:
        """Every value of a header as one (repeated headers joined), or None."""
        ...

    def cookie(self, name: str) -> str | None: ...

    def query_value(self, name: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission to stream; `expires_at` (the gateway clock) ends the stream with the token."""

    expires_at: float | None = None


ALLOW = Grant()


def topic_name(target: Target) -> str:
    name = "/".join(target.params)
    return f"{name}?{urlencode(target.query)}" if target.query else name


class Authorizer:
    """One per app: checks requests against their route's `auth` table."""

    def __init__(self, session: aiohttp.ClientSession, clock: Clock) -> None:
        self._session = session
        self._clock = clock
        self._jwks: dict[str, tuple[float, dict[str, jwt.PyJWK]]] = {}
        self._jwks_tried: dict[str, float] = {}
        self._jwks_inflight: dict[str, asyncio.Task[dict[str, jwt.PyJWK]]] = {}
        self._forward_cache: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], asyncio.Task[tuple[int, bool]]] = {}

    async def check(self, request: AuthRequest, target: Target) -> Grant:
        auth = target.route.auth
        if auth.jwt is not None:
            return await self._check_jwt(request, target, auth.jwt)
        if auth.forward is not None:
            return await self._check_forward(request, target, auth.forward)
        return ALLOW

    # --- jwt -------------------------------------------------------------------------

    async def _check_jwt(self, request: AuthRequest, target: Target, cfg: JwtConfig) -> Grant:
        token = _token(request, cfg)
        if token is None:
            raise Unauthorized("a token is required", headers={"WWW-Authenticate": "Bearer"})
        key = await self._key_for(token, cfg)
        claims = verify_token(token, key, cfg)
        patterns = claims.get(cfg.topics_claim)
        topic = topic_name(target)
        if isinstance(patterns, str):
            patterns = patterns.split()
        if not isinstance(patterns, list) or not any(
            isinstance(p, str) and fnmatch.fnmatchcase(topic, p) for p in patterns
        ):
            raise AuthDenied("this token may not subscribe to this topic")
        return Grant(expires_at=self._clock.now() + seconds_left(claims, cfg, time.time()))

    async def _key_for(self, token: str, cfg: JwtConfig) -> str | jwt.PyJWK:
        if cfg.jwks_url is None:
            assert cfg.key is not None  # config requires a key or a jwks_url
            return cfg.key
        kid = token_kid(token)
        keys = await self._jwks_keys(cfg, refresh=False)
        if kid not in keys:
            keys = await self._jwks_keys(cfg, refresh=True)
        if kid in keys:
            return keys[kid]
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        raise Unauthorized("invalid token: no JWKS key for this token")

    async def _jwks_keys(self, cfg: JwtConfig, refresh: bool) -> dict[str, jwt.PyJWK]:
        url = cfg.jwks_url
        assert url is not None
        now = self._clock.now()
        cached = self._jwks.get(url)
        tried = self._jwks_tried.get(url)
        recently = tried is not None and now - tried < JWKS_MIN_REFRESH_SECONDS
        if cached is not None:
            fresh = now - cached[0] < cfg.jwks_cache_seconds
            if (fresh and not refresh) or recently:
                return cached[1]
        elif recently and url not in self._jwks_inflight:
            # The fetch moments ago failed: answer at once rather than hammer the IdP.
            raise AuthUnavailable("cannot verify tokens now", headers={"Retry-After": "5"})
        # One fetch at a time per URL: concurrent requests share it.
        task = self._jwks_inflight.get(url)
        if task is None:
            task = asyncio.create_task(self._fetch_jwks(url))
            self._jwks_inflight[url] = task
            task.add_done_callback(lambda _: self._jwks_inflight.pop(url, None))
        return await asyncio.shield(task)

    async def _fetch_jwks(self, url: str) -> dict[str, jwt.PyJWK]:
        now = self._clock.now()
        self._jwks_tried[url] = now
        cached = self._jwks.get(url)
        try:
            keys = await fetch_keys(self._session, url)
        # RecursionError: json refuses a document nested deeper than the interpreter's stack.
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            why = str(exc) if isinstance(exc, JwksError) else type(exc).__name__
            log.warning("JWKS fetch from %s failed: %s", url, why)
            if cached is not None:
                return cached[1]  # keep serving with the keys we had
            raise AuthUnavailable(
                "cannot verify tokens now", headers={"Retry-After": "5"}
            ) from None
        self._jwks[url] = (now, keys)
        return keys

    # --- forward -----------------------------------------------------------------------

    async def _check_forward(
        self, request: AuthRequest, target: Target, cfg: ForwardAuthConfig
    ) -> Grant:
        topic = topic_name(target)
        if not _HEADER_VALUE.fullmatch(topic):
            # A route pattern may admit what no header can carry (aiohttp's client refuses
            # CR, LF and NUL); the backend must decide on exactly the topic served.
            raise BadRequest("this topic cannot be sent to the auth backend")
        forwarded = {h: v for h in cfg.headers if (v := request.joined(h)) is not None}
        uri = request.path
        if not all(_HEADER_VALUE.fullmatch(v) for v in (uri, *forwarded.values())):
            raise BadRequest("a request header cannot be sent to the auth backend")
        credential = hashlib.sha256(json.dumps(sorted(forwarded.items())).encode()).hexdigest()
        key = (target.route.name, topic, credential)
        cached = self._forward_cache.get(key)
        if cached is not None and cached[0] > self._clock.now():
            self._forward_cache.move_to_end(key)
            return _forward_decision(cached[1])
        # The question runs in its own task, shared by every identical request: a client
        # that leaves cancels only its own wait, never the answer the others are waiting for.
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(target, cfg, forwarded, topic, uri))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settle(key, t, cfg.cache_seconds))
        status, _ = await asyncio.shield(task)
        return _forward_decision(status)

    def _settle(
        self, key: tuple[str, str, str], task: asyncio.Task[tuple[int, bool]], ttl: float
    ) -> None:
        del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return
        status, definite = task.result()
        if definite and (200 <= status < 300 or status in (401, 403)):
            cache = self._forward_cache
            cache[key] = (self._clock.now() + ttl, status)
            cache.move_to_end(key)
            while len(cache) > FORWARD_CACHE_ENTRIES:
                cache.popitem(last=False)

    async def _ask(
        self,
        target: Target,
        cfg: ForwardAuthConfig,
        forwarded: dict[str, str],
        topic: str,
        uri: str,
    ) -> tuple[int, bool]:
        """The backend's status, and whether it is a real answer (fail-open ones are not)."""
        headers = forwarded | {
            "X-Gateway-Route": target.route.name,
            "X-Gateway-Topic": topic,
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Uri": uri,
        }
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_seconds)
        try:
            async with self._session.get(
                cfg.url, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("auth backend %s: %s", cfg.url, type(exc).__name__)
            if cfg.fail_open:
                return 200, False  # allowed now, but not remembered
            raise AuthUnavailable(
                "authorization is unavailable", headers={"Retry-After": "5"}
            ) from None
        if not (200 <= status < 300 or status in (401, 403)):
            log.warning("auth backend %s answered %s", cfg.url, status)
        return status, True


def verify_token(token: str, key: str | jwt.PyJWK, cfg: JwtConfig) -> dict[str, Any]:
    """The token's claims once PyJWT's checks pass; any token that fails is a GatewayError."""
    if not _TOKEN.fullmatch(token):
        raise Unauthorized("invalid token: malformed")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(cfg.algorithms),
            audience=cfg.audience,
            issuer=cfg.issuer,
            leeway=cfg.leeway_seconds,
            # With no audience named, PyJWT refuses a token that carries one: a token
            # minted for another service of the same issuer does not open this route.
            options={"verify_aud": not cfg.allow_any_audience, "require": ["exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired", headers={"WWW-Authenticate": "Bearer"}) from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("token not yet valid") from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
        raise AuthDenied(f"token not for this service: {type(exc).__name__}") from None
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
    return claims


def token_kid(token: str) -> str | None:
    """The `kid` a token names, unverified: only to pick the JWKS key to verify it with."""
    if not _TOKEN.fullmatch(token):
        raise Unauthorized("invalid token: malformed")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
    if kid is not None and not isinstance(kid, str):
        raise Unauthorized("invalid token: kid is not a string")
    return kid


def seconds_left(claims: Mapping[str, Any], cfg: JwtConfig, now: float) -> float:
    """How long the grant of a verified token lasts: until `exp` plus the leeway it was
    checked with, so a token accepted within its leeway gets a stream that does not end at
    once; at least a second, at most MAX_GRANT_SECONDS."""
    try:
        exp = int(claims["exp"])  # as PyJWT read it; it may be an int no float holds
    except (KeyError, TypeError, ValueError, OverflowError):
        raise Unauthorized("invalid token: exp") from None
    whole = exp - math.floor(now)  # in ints: 10**400 - now must not overflow
    if whole > MAX_GRANT_SECONDS:
        return MAX_GRANT_SECONDS
    return max(1.0, whole - (now - math.floor(now)) + cfg.leeway_seconds)


def _forward_decision(status: int) -> Grant:
    if 200 <= status < 300:
        return ALLOW
    if status == 401:
        raise Unauthorized("not signed in")
    if status == 403:
        raise AuthDenied("not allowed to subscribe to this topic")
    raise AuthUnavailable("authorization is unavailable", headers={"Retry-After": "5"})


def _token(request: AuthRequest, cfg: JwtConfig) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if cfg.cookie and (cookie := request.cookie(cfg.cookie)) is not None:
        return cookie
    if cfg.query_param:
        return request.query_value(cfg.query_param)
    return None

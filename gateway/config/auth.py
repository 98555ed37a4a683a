"""Configuration of who may subscribe: a route's `[routes.auth]` table.

Read by `routeconfig` (in the config layer, the one place configuration is
read) through `read_auth`, which records problems on the same table object as
every other key, so an auth mistake is reported with its key path like any
other.

    [routes.auth]                       [routes.auth]
    type = "jwt"                        type = "forward"
    algorithms = ["RS256"]              url = "http://127.0.0.1:9000/auth"
    key = { file = "/keys/jwt.pem" }    headers = ["Cookie", "Authorization"]
    audience = "sse"                    timeout_seconds = 2.0
    cookie = "token"                    cache_seconds = 30.0
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .table import MASK, MASKED_PROBLEM

if TYPE_CHECKING:
    from .table import Table

ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    key: str | None = field(repr=False)  # an HMAC secret or a PEM public key
    jwks_url: str | None
    jwks_cache_seconds: float
    audience: str | None
    # A token that names an audience is refused on a route that names none, unless this is
    # set: without it a token minted for any other service of the same issuer would do.
    allow_any_audience: bool
    issuer: str | None
    leeway_seconds: float
    topics_claim: str
    cookie: str | None
    query_param: str | None


@dataclass(frozen=True, slots=True)
class ForwardAuthConfig:
    url: str
    headers: tuple[str, ...]
    timeout_seconds: float
    cache_seconds: float
    fail_open: bool


@dataclass(frozen=True, slots=True)
class AuthConfig:
    type: str = "none"
    jwt: JwtConfig | None = None
    forward: ForwardAuthConfig | None = None


NO_AUTH = AuthConfig()


def _secret(table: Table, name: str, environ: Mapping[str, str]) -> str | None:
    """A literal, `{ env = "VAR" }` or `{ file = "/path" }`; never echoed in a problem."""
    table.used.add(name)
    value: Any = table.data.get(name)
    if value == MASK:
        table.problem(name, MASKED_PROBLEM)
        return None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
        if value["env"] not in environ:
            table.problem(name, f"environment variable {value['env']} is not set")
            return None
        return environ[value["env"]]
    if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
        try:
            with open(value["file"], encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            table.problem(name, f"cannot read {value['file']}: {exc.strerror}")
            return None
    table.problem(name, 'expected a string, { env = "VAR" } or { file = "/path" }')
    return None


def _url(value: str) -> str | None:
    return None if re.fullmatch(r"https?://[^\s/]+(/\S*)?", value) else "expected an http(s) URL"


def _check_plain_http(table: Table, name: str, url: str | None) -> None:
    """Plain http only to this host, unless the operator says the network is trusted.

    Over plain http a JWKS can be swapped in transit (then any token verifies), and a
    forward-auth request carries the client's cookies and tokens in clear.
    """
    allowed = table.get("allow_plain_http", bool, False)  # read always: a known key
    if not url or not url.startswith("http://") or allowed:
        return
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        table.problem(
            name,
            f"plain http to {host!r} sends credentials or keys in clear: use https, or set "
            "allow_plain_http = true for a trusted network",
        )


def _headers(table: Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    names = table.strings(name, default)
    for header in names:
        if not _HEADER.fullmatch(header):
            table.problem(name, f"{header!r} is not a header name")
    return names


def read_auth(table: Table, environ: Mapping[str, str]) -> AuthConfig:
    kind = table.get(
        "type",
        str,
        "none",
        lambda v: None if v in ("none", "jwt", "forward") else "one of none, jwt, forward",
    )
    if kind == "jwt":
        algorithms = table.strings("algorithms", ("HS256",))
        for algorithm in algorithms:
            if algorithm not in ALGORITHMS:
                table.problem("algorithms", f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        key = _secret(table, "key", environ)
        jwks_url = table.get("jwks_url", str, "", _url) or None
        _check_plain_http(table, "jwks_url", jwks_url)
        if key is None and jwks_url is None and "key" not in table.data:
            table.problem("key", "a jwt route needs a key or a jwks_url")
        audience = table.get("audience", str, "") or None
        allow_any_audience = table.get("allow_any_audience", bool, False)
        if audience is not None and allow_any_audience:
            table.problem(
                "allow_any_audience",
                "the route names an audience; remove one of audience and allow_any_audience",
            )
        jwt = JwtConfig(
            algorithms=algorithms,
            key=key,
            jwks_url=jwks_url,
            jwks_cache_seconds=table.get("jwks_cache_seconds", float, 300.0),
            audience=audience,
            allow_any_audience=allow_any_audience,
            issuer=table.get("issuer", str, "") or None,
            leeway_seconds=table.get("leeway_seconds", float, 5.0),
            topics_claim=table.get("topics_claim", str, "topics"),
            cookie=table.get("cookie", str, "") or None,
            query_param=table.get("query_param", str, "") or None,
        )
        table.finish()
        return AuthConfig("jwt", jwt=jwt)
    if kind == "forward":
        url = table.get("url", str, "", _url)
        if not url:
            table.problem("url", "a forward route needs the auth backend's url")
        _check_plain_http(table, "url", url)
        forward = ForwardAuthConfig(
            url=url,
            headers=_headers(table, "headers", ("Cookie", "Authorization")),
            timeout_seconds=table.get("timeout_seconds", float, 2.0),
            cache_seconds=table.get("cache_seconds", float, 30.0),
            fail_open=table.get("fail_open", bool, False),
        )
        table.finish()
        return AuthConfig("forward", forward=forward)
    table.finish()
    return NO_AUTH


__all__ = ["NO_AUTH", "AuthConfig", "ForwardAuthConfig", "JwtConfig", "read_auth"]

"""One route's configuration: a `[[routes]]` table, or `[defaults]`, read and checked.

A route maps a downstream path template (`/events/{topic}`) onto an upstream
URL template. The checks here hold parameters to whole path segments that
appear in both, and keep the upstream's scheme, host and port fixed by
configuration. `config` reads the document and hands each table here as a
`Table`, so route problems are reported with their key path like any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .auth import NO_AUTH, AuthConfig, read_auth
from .table import MASK, MASKED_PROBLEM, MISSING, Table, non_negative, positive, readable

DEFAULT_PARAM_PATTERN = r"[A-Za-z0-9._~-]+"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_NOT_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5
# An origin, where "*." before the host stands for one or more subdomain labels.
_ORIGIN = re.compile(r"https?://(\*\.)?[A-Za-z0-9.-]+(:\d+)?")
# Headers a client may never pass to an upstream in direct mode: hop-by-hop ones (RFC 9110
# 7.6.1), framing ones (request smuggling), and those the gateway itself sets.
_NOT_FORWARDED = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "last-event-id",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    )
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


@dataclass(frozen=True, slots=True)
class UpstreamHeader:
    """A header added to every upstream request; `value` is hidden from repr when secret."""

    name: str
    value: str = field(repr=False)
    secret: bool = False


# Room on an event-sized line for its field name ("data: ") and then some.
LINE_HEADROOM_BYTES = 64


def option(default: Any, check: Callable[[Any], str | None] | None = None, *, doc: str = "") -> Any:
    """A route option: settable under [defaults] and per route, read by walking the fields.

    The default, its check and a one-line doc live here only; `read_defaults` derives the
    reader, and tests hold config/gateway.toml to these defaults. A tuple default is a list
    of strings; `check=readable` marks a file path, where "" (and None) mean "not set".
    """
    return field(default=default, metadata={"option": True, "check": check, "doc": doc})


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else " or ".join(choices)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    name: str
    path: str
    upstream: str
    params: tuple[tuple[str, str], ...]
    query: tuple[str, ...]
    upstream_headers: tuple[UpstreamHeader, ...]
    heartbeat_seconds: float = option(15.0, non_negative, doc="comment to idle subscribers")
    retry_ms: int = option(2000, non_negative, doc="`retry:` sent at connect, lowest")
    retry_max_ms: int = option(5000, non_negative, doc="`retry:` sent at connect, highest")
    linger_seconds: float = option(5.0, non_negative, doc="upstream kept after the last leaves")
    max_unsent_bytes: int = option(256 * 1024, positive, doc="backlog that cuts a subscriber")
    max_line_bytes: int = option(
        0, non_negative, doc="longest upstream line; 0 = follows max_event_bytes"
    )
    max_event_bytes: int = option(1024 * 1024, positive, doc="largest upstream event")
    upstream_connect_timeout_seconds: float = option(10.0, positive)
    upstream_idle_timeout_seconds: float = option(120.0, non_negative, doc="stalled upstream")
    reconnect_initial_seconds: float = option(0.5, positive, doc="first reconnect wait")
    reconnect_max_seconds: float = option(30.0, positive, doc="longest reconnect wait")
    max_topics: int = option(1000, positive, doc="topics (upstreams) per route")
    max_subscribers: int = option(0, non_negative, doc="subscribers per route; 0 = no cap")
    write_timeout_seconds: float = option(30.0, positive, doc="backlog not draining this long")
    ring_events: int = option(1000, positive, doc="replay ring per topic: events")
    ring_bytes: int = option(1024 * 1024, positive, doc="replay ring per topic: bytes")
    ring_seconds: float = option(300.0, positive, doc="replay ring per topic: age")
    upstream_resume: bool = option(True, doc="the upstream honours Last-Event-ID")
    max_catchups: int = option(4, non_negative, doc="concurrent catch-ups per topic")
    catchup_timeout_seconds: float = option(10.0, positive, doc="catch-up deadline")
    catchup_max_bytes: int = option(1024 * 1024, positive, doc="catch-up buffer")
    cors_origins: tuple[str, ...] = option((), doc="allowed Origins")
    cors_credentials: bool = option(False, doc="Access-Control-Allow-Credentials")
    cors_expose_headers: tuple[str, ...] = option((), doc="Access-Control-Expose-Headers")
    cors_max_age_seconds: int = option(600, non_negative, doc="preflight cache")
    # shared: one upstream per topic for everyone; direct: one upstream request per client,
    # carrying that client's `forward_headers` (per-user streams).
    mode: str = option("shared", _one_of("shared", "direct"), doc="shared or direct")
    forward_headers: tuple[str, ...] = option(("Cookie", "Authorization"), doc="direct mode")
    # Direct mode passes the upstream's own `retry:` and adds none (a client there must reconnect
    # as it would talking to the upstream); true adds the gateway's retry_ms range as in shared.
    direct_retry: bool = option(False, doc="direct mode: also send the gateway's retry:")
    upstream_ca_file: str | None = option(None, readable, doc="CA bundle for https upstreams")
    upstream_client_cert_file: str | None = option(None, readable, doc="mTLS certificate")
    upstream_client_key_file: str | None = option(None, readable, doc="mTLS key")
    auth: AuthConfig = NO_AUTH

    @property
    def line_limit(self) -> int:
        """The longest upstream line kept: `max_line_bytes`, or by default one line that holds
        a whole event of `max_event_bytes` (a single-line JSON event is the common case)."""
        return self.max_line_bytes or self.max_event_bytes + LINE_HEADROOM_BYTES


# Route options in declaration order: what [defaults] and a [[routes]] table may set besides
# name, path, upstream, params, query, upstream_headers and auth.
ROUTE_OPTIONS = tuple(f for f in fields(RouteConfig) if f.metadata.get("option"))


def _read_route_options(table: Table, base: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for f in ROUTE_OPTIONS:
        check = f.metadata["check"]
        if isinstance(f.default, tuple):
            options[f.name] = table.strings(f.name, base[f.name])
        elif check is readable:
            options[f.name] = table.get(f.name, str, base[f.name] or "", readable) or None
        else:
            options[f.name] = table.get(f.name, type(f.default), base[f.name], check)
    for origin in options["cors_origins"]:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            table.problem(
                "cors_origins",
                f"{origin!r} is not an origin like https://app.example.com, "
                "https://*.example.com or *",
            )
    for name in ("cors_expose_headers", "forward_headers"):
        for header in options[name]:
            if not _HEADER_NAME.fullmatch(header):
                table.problem(name, f"{header!r} is not a header name")
            elif name == "forward_headers" and header.lower() in _NOT_FORWARDED:
                table.problem(name, f"{header!r} is not forwarded: the gateway owns it")
    if options["cors_credentials"] and "*" in options["cors_origins"]:
        # Browsers refuse credentials with "*", and echoing every origin with credentials
        # would let any site read the stream as the user: name the origins.
        table.problem("cors_credentials", 'cannot be used with cors_origins = ["*"]')
    if bool(options["upstream_client_cert_file"]) != bool(options["upstream_client_key_file"]):
        table.problem("upstream_client_key_file", "goes with upstream_client_cert_file")
    return options


def read_defaults(table: Table) -> dict[str, Any]:
    """The `[defaults]` table: route options every route starts from."""
    base = {f.name: f.default for f in ROUTE_OPTIONS}
    defaults = _read_route_options(table, base)
    table.finish()
    return defaults


def _read_headers(table: Table, environ: Mapping[str, str]) -> tuple[UpstreamHeader, ...]:
    headers = []
    for name in table.data:
        table.used.add(name)
        value = table.data[name]
        if not _HEADER_NAME.fullmatch(name):
            table.problem(name, "not a valid header name")
        elif value == MASK:
            table.problem(name, MASKED_PROBLEM)
        elif isinstance(value, str) and _NOT_FIELD_VALUE.search(value):
            table.problem(name, "value holds a control character (CR, LF, NUL...)")
        elif isinstance(value, str):
            headers.append(UpstreamHeader(name, value))
        elif (
            isinstance(value, dict)
            and set(value) <= {"env", "prefix"}
            and isinstance(value.get("env"), str)
        ):
            prefix = value.get("prefix", "")
            if value["env"] not in environ:
                table.problem(name, f"environment variable {value['env']} is not set")
            elif not isinstance(prefix, str):
                table.problem(name, "prefix must be a string")
            elif _NOT_FIELD_VALUE.search(prefix + environ[value["env"]]):
                # Never echo the value: it is a secret.
                table.problem(name, f"{value['env']} holds a control character (CR, LF, NUL...)")
            else:
                headers.append(UpstreamHeader(name, prefix + environ[value["env"]], secret=True))
        else:
            table.problem(name, 'expected a string or { env = "VAR", prefix = "..." }')
    return tuple(headers)


def read_route(
    table: Table, index: int, defaults: Mapping[str, Any], environ: Mapping[str, str]
) -> RouteConfig | None:
    before = len(table.problems)
    name = table.get(
        "name",
        str,
        f"route{index}",
        lambda v: None if _ROUTE_NAME.fullmatch(v) else "use letters, digits, - and _",
    )
    path = table.get("path", str, MISSING)
    upstream = table.get("upstream", str, MISSING)
    if path is MISSING:
        table.problem("path", 'is required, e.g. "/events/{topic}"')
    if upstream is MISSING:
        table.problem("upstream", 'is required, e.g. "http://127.0.0.1:9000/stream/{topic}"')
    patterns = table.table("params")
    query = table.strings("query", ())
    headers = _read_headers(table.table("upstream_headers"), environ)
    auth = read_auth(table.table("auth"), environ)
    if auth.jwt is not None and auth.jwt.query_param and auth.jwt.query_param in query:
        # It would carry the token upstream, into the topic key and into the access log.
        table.problem("query", f"{auth.jwt.query_param!r} is the route's token parameter")
    options = _read_route_options(table, defaults)
    table.finish()
    if path is MISSING or upstream is MISSING:
        return None

    path_params = _check_path_template(table, path)
    upstream_params = _check_upstream_template(table, upstream)
    params = []
    for param in path_params:
        patterns.used.add(param)
        pattern = patterns.data.get(param, DEFAULT_PARAM_PATTERN)
        if not isinstance(pattern, str):
            patterns.problem(param, "expected a regular expression string")
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            patterns.problem(param, f"invalid regular expression: {exc}")
        params.append((param, pattern))
    patterns.finish()
    for param in sorted(set(path_params) - set(upstream_params)):
        table.problem("path", f"parameter {{{param}}} is not used in upstream")
    for param in sorted(set(upstream_params) - set(path_params)):
        table.problem("upstream", f"parameter {{{param}}} does not appear in path")
    for q in query:
        if not q or not _HEADER_NAME.fullmatch(q):
            table.problem("query", f"{q!r} is not a plain parameter name")
    if options["reconnect_max_seconds"] < options["reconnect_initial_seconds"]:
        table.problem("reconnect_max_seconds", "must not be less than reconnect_initial_seconds")
    if options["retry_ms"] and options["retry_max_ms"] < options["retry_ms"]:
        table.problem("retry_max_ms", "must not be less than retry_ms")
    if len(table.problems) > before:
        return None
    return RouteConfig(
        name=name,
        path=path,
        upstream=upstream,
        params=tuple(params),
        query=query,
        upstream_headers=headers,
        auth=auth,
        **options,
    )


def _check_path_template(table: Table, path: str) -> list[str]:
    """Parameters may only be whole segments: `/events/{topic}`, never `/e-{x}`."""
    if not path.startswith("/"):
        table.problem("path", "must start with /")
        return []
    names = []
    for segment in path.split("/")[1:]:
        found = PLACEHOLDER.findall(segment)
        if found and not PLACEHOLDER.fullmatch(segment):
            table.problem("path", f"parameter must be a whole path segment: {segment!r}")
        elif not found and ("{" in segment or "}" in segment):
            table.problem("path", f"malformed parameter in {segment!r}")
        names.extend(found)
    if len(names) != len(set(names)):
        table.problem("path", "a parameter appears twice")
    return names


def _check_upstream_template(table: Table, upstream: str) -> list[str]:
    """Scheme, host and port are fixed by configuration: placeholders only in the path."""
    parts = urlsplit(PLACEHOLDER.sub("x", upstream))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        table.problem("upstream", "must be an absolute http:// or https:// URL")
        return []
    if parts.username or parts.password:
        table.problem("upstream", "credentials in the URL are not allowed; use upstream_headers")
    after_scheme = upstream.find("://") + 3
    slash = upstream.find("/", after_scheme)
    scheme_host = upstream if slash < 0 else upstream[:slash]
    if PLACEHOLDER.search(scheme_host) or parts.query or parts.fragment:
        table.problem("upstream", "parameters may appear only in the path; no query or fragment")
    path = upstream[len(scheme_host) :]
    names = []
    for segment in path.split("/"):
        found = PLACEHOLDER.findall(segment)
        if found and not PLACEHOLDER.fullmatch(segment):
            table.problem("upstream", f"parameter must be a whole path segment: {segment!r}")
        names.extend(found)
    return names

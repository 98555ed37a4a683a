"""Configuration: the one place that reads files, the environment and the command line.

`load()` merges, lowest precedence first: the built-in defaults, a TOML file
(or the embedded demo configuration when no file and no quick-start route is
given), `SSE_GATEWAY_*` environment variables, then CLI flags. It returns
frozen, validated objects; every other module receives these and reads
nothing itself. Every problem found is collected into one `ConfigError`,
each line naming the key (`routes[0].heartbeat_seconds: ...`), so an operator
fixes a file in one pass.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .authconfig import NO_AUTH, AuthConfig, read_auth
from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PARAM_PATTERN = r"[A-Za-z0-9._~-]+"
ENV_PREFIX = "SSE_GATEWAY_"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
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
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamHeader:
    """A header added to every upstream request; `value` is hidden from repr when secret."""

    name: str
    value: str = field(repr=False)
    secret: bool = False


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    path: str
    upstream: str
    params: tuple[tuple[str, str], ...]
    query: tuple[str, ...]
    upstream_headers: tuple[UpstreamHeader, ...]
    heartbeat_seconds: float
    retry_ms: int
    retry_max_ms: int
    linger_seconds: float
    max_unsent_bytes: int
    max_line_bytes: int
    max_event_bytes: int
    upstream_connect_timeout_seconds: float
    upstream_idle_timeout_seconds: float
    reconnect_initial_seconds: float
    reconnect_max_seconds: float
    max_topics: int
    max_subscribers: int
    write_timeout_seconds: float
    ring_events: int
    ring_bytes: int
    ring_seconds: float
    upstream_resume: bool
    max_catchups: int
    catchup_timeout_seconds: float
    catchup_max_bytes: int
    cors_origins: tuple[str, ...]
    cors_credentials: bool
    cors_expose_headers: tuple[str, ...]
    cors_max_age_seconds: int
    # shared: one upstream per topic for everyone; direct: one upstream request per client,
    # carrying that client's `forward_headers` (per-user streams).
    mode: str
    forward_headers: tuple[str, ...]
    upstream_ca_file: str | None
    upstream_client_cert_file: str | None
    upstream_client_key_file: str | None
    auth: AuthConfig = NO_AUTH


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Listen
    workers: int
    tls_cert_file: str | None
    tls_key_file: str | None
    drain_seconds: float
    shutdown_timeout_seconds: float
    log_level: str
    access_log: str
    # Peers whose X-Forwarded-For names the client (load balancers, ingress).
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Admission limits and input bounds for the whole process (0 = no limit)."""

    max_subscribers: int
    max_subscribers_per_client: int
    max_connections_per_second: float
    max_last_event_id_bytes: int
    max_header_bytes: int
    header_timeout_seconds: float


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    # A separate internal listener, or None to serve `path` on the main port.
    listen: Listen | None
    path: str


@dataclass(frozen=True, slots=True)
class DemoConfig:
    enabled: bool
    listen: Listen
    interval_seconds: float


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig
    limits: LimitsConfig
    metrics: MetricsConfig
    demo: DemoConfig
    routes: tuple[RouteConfig, ...]


# --- the reader -------------------------------------------------------------

T = TypeVar("T")
_MISSING: Any = object()


class _Table:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, data: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.problems = problems
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def get(
        self, name: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        self.used.add(name)
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(name, f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
            return default
        if check is not None and (message := check(value)) is not None:
            self.problem(name, message)
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, _MISSING)
        if value is _MISSING:
            return default
        if not all(isinstance(item, str) for item in value):
            self.problem(name, "expected a list of strings")
            return default
        return tuple(value)

    def table(self, name: str) -> _Table:
        value = self.get(name, dict, {})
        return _Table(value, self.key(name), self.problems)

    def finish(self) -> None:
        for name in sorted(set(self.data) - self.used):
            self.problem(name, "unknown key")


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be 0 or greater"


def _workers(table: _Table) -> int:
    """`workers = N` or "auto" (one per core)."""
    table.used.add("workers")
    value = table.data.get("workers", 1)
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    table.problem("workers", f'expected a number from 1 to 256 or "auto", got {value!r}')
    return 1


def _readable(value: str) -> str | None:
    if not value:
        return None
    return None if os.access(value, os.R_OK) else f"cannot read {value!r}"


def _listen(value: str) -> str | None:
    return None if _parse_listen(value) is not None else "expected HOST:PORT, e.g. 127.0.0.1:8080"


def _parse_listen(value: str) -> Listen | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Listen(host or "0.0.0.0", int(port))  # noqa: S104 - an empty host means all, as in nginx


_LOG_LEVELS = ("debug", "info", "warning", "error")

# Route options: settable under [defaults] and per route. Each default's "why"
# is in the README's table of defaults, which must be kept in step with this.
_ROUTE_OPTIONS: tuple[tuple[str, type, Any, Callable[[Any], str | None] | None], ...] = (
    ("heartbeat_seconds", float, 15.0, _non_negative),
    ("retry_ms", int, 2000, _non_negative),
    ("retry_max_ms", int, 5000, _non_negative),
    ("linger_seconds", float, 5.0, _non_negative),
    ("max_unsent_bytes", int, 256 * 1024, _positive),
    ("max_line_bytes", int, 64 * 1024, _positive),
    ("max_event_bytes", int, 1024 * 1024, _positive),
    ("upstream_connect_timeout_seconds", float, 10.0, _positive),
    ("upstream_idle_timeout_seconds", float, 120.0, _non_negative),
    ("reconnect_initial_seconds", float, 0.5, _positive),
    ("reconnect_max_seconds", float, 30.0, _positive),
    ("max_topics", int, 1000, _positive),
    ("max_subscribers", int, 0, _non_negative),
    ("write_timeout_seconds", float, 30.0, _positive),
    ("ring_events", int, 1000, _positive),
    ("ring_bytes", int, 1024 * 1024, _positive),
    ("ring_seconds", float, 300.0, _positive),
    ("upstream_resume", bool, True, None),
    ("max_catchups", int, 4, _non_negative),
    ("catchup_timeout_seconds", float, 10.0, _positive),
    ("catchup_max_bytes", int, 1024 * 1024, _positive),
    ("cors_credentials", bool, False, None),
    ("cors_max_age_seconds", int, 600, _non_negative),
    ("mode", str, "shared", lambda v: None if v in ("shared", "direct") else "shared or direct"),
)


def _read_route_options(table: _Table, base: Mapping[str, Any]) -> dict[str, Any]:
    options = {
        name: table.get(name, kind, base[name], check) for name, kind, _, check in _ROUTE_OPTIONS
    }
    options["cors_origins"] = table.strings("cors_origins", base["cors_origins"])
    for origin in options["cors_origins"]:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            table.problem(
                "cors_origins",
                f"{origin!r} is not an origin like https://app.example.com, "
                "https://*.example.com or *",
            )
    options["cors_expose_headers"] = table.strings(
        "cors_expose_headers", base["cors_expose_headers"]
    )
    options["forward_headers"] = table.strings("forward_headers", base["forward_headers"])
    for name in ("cors_expose_headers", "forward_headers"):
        for header in options[name]:
            if not _HEADER_NAME.fullmatch(header):
                table.problem(name, f"{header!r} is not a header name")
            elif name == "forward_headers" and header.lower() in _NOT_FORWARDED:
                table.problem(name, f"{header!r} is not forwarded: the gateway owns it")
    for name in ("upstream_ca_file", "upstream_client_cert_file", "upstream_client_key_file"):
        options[name] = table.get(name, str, base[name] or "", _readable) or None
    if options["cors_credentials"] and "*" in options["cors_origins"]:
        # Browsers refuse credentials with "*", and echoing every origin with credentials
        # would let any site read the stream as the user: name the origins.
        table.problem("cors_credentials", 'cannot be used with cors_origins = ["*"]')
    if bool(options["upstream_client_cert_file"]) != bool(options["upstream_client_key_file"]):
        table.problem("upstream_client_key_file", "goes with upstream_client_cert_file")
    return options


def _read_headers(table: _Table, environ: Mapping[str, str]) -> tuple[UpstreamHeader, ...]:
    headers = []
    for name in table.data:
        table.used.add(name)
        value = table.data[name]
        if not _HEADER_NAME.fullmatch(name):
            table.problem(name, "not a valid header name")
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


def _read_route(
    table: _Table, index: int, defaults: Mapping[str, Any], environ: Mapping[str, str]
) -> RouteConfig | None:
    before = len(table.problems)
    name = table.get(
        "name",
        str,
        f"route{index}",
        lambda v: None if _ROUTE_NAME.fullmatch(v) else "use letters, digits, - and _",
    )
    path = table.get("path", str, _MISSING)
    upstream = table.get("upstream", str, _MISSING)
    if path is _MISSING:
        table.problem("path", 'is required, e.g. "/events/{topic}"')
    if upstream is _MISSING:
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
    if path is _MISSING or upstream is _MISSING:
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


def _check_path_template(table: _Table, path: str) -> list[str]:
    """Parameters may only be whole segments: `/events/{topic}`, never `/e-{x}`."""
    if not path.startswith("/"):
        table.problem("path", "must start with /")
        return []
    names = []
    for segment in path.split("/")[1:]:
        found = _PLACEHOLDER.findall(segment)
        if found and not _PLACEHOLDER.fullmatch(segment):
            table.problem("path", f"parameter must be a whole path segment: {segment!r}")
        elif not found and ("{" in segment or "}" in segment):
            table.problem("path", f"malformed parameter in {segment!r}")
        names.extend(found)
    if len(names) != len(set(names)):
        table.problem("path", "a parameter appears twice")
    return names


def _check_upstream_template(table: _Table, upstream: str) -> list[str]:
    """Scheme, host and port are fixed by configuration: placeholders only in the path."""
    parts = urlsplit(_PLACEHOLDER.sub("x", upstream))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        table.problem("upstream", "must be an absolute http:// or https:// URL")
        return []
    if parts.username or parts.password:
        table.problem("upstream", "credentials in the URL are not allowed; use upstream_headers")
    after_scheme = upstream.find("://") + 3
    slash = upstream.find("/", after_scheme)
    scheme_host = upstream if slash < 0 else upstream[:slash]
    if _PLACEHOLDER.search(scheme_host) or parts.query or parts.fragment:
        table.problem("upstream", "parameters may appear only in the path; no query or fragment")
    path = upstream[len(scheme_host) :]
    names = []
    for segment in path.split("/"):
        found = _PLACEHOLDER.findall(segment)
        if found and not _PLACEHOLDER.fullmatch(segment):
            table.problem("upstream", f"parameter must be a whole path segment: {segment!r}")
        names.extend(found)
    return names


def from_document(doc: Mapping[str, Any], environ: Mapping[str, str]) -> GatewayConfig:
    """Validate a parsed TOML document (the file layout) into a GatewayConfig."""
    problems: list[str] = []
    root = _Table(doc, "", problems)

    server = root.table("server")
    listen = server.get("listen", str, "127.0.0.1:8080", _listen)
    server_config = ServerConfig(
        listen=_parse_listen(listen) or Listen("127.0.0.1", 8080),
        workers=_workers(server),
        tls_cert_file=server.get("tls_cert_file", str, "", _readable) or None,
        tls_key_file=server.get("tls_key_file", str, "", _readable) or None,
        drain_seconds=server.get("drain_seconds", float, 5.0, _non_negative),
        shutdown_timeout_seconds=server.get("shutdown_timeout_seconds", float, 10.0, _non_negative),
        log_level=server.get(
            "log_level",
            str,
            "info",
            lambda v: None if v in _LOG_LEVELS else f"one of {', '.join(_LOG_LEVELS)}",
        ),
        access_log=server.get(
            "access_log",
            str,
            "text",
            lambda v: None if v in ("text", "json", "off") else "one of text, json, off",
        ),
        trusted_proxies=_networks(server, "trusted_proxies"),
    )
    if bool(server_config.tls_cert_file) != bool(server_config.tls_key_file):
        server.problem("tls_key_file", "goes with tls_cert_file: set both to serve HTTPS")
    server.finish()

    limits = root.table("limits")
    limits_config = LimitsConfig(
        max_subscribers=limits.get("max_subscribers", int, 20000, _non_negative),
        max_subscribers_per_client=limits.get("max_subscribers_per_client", int, 64, _non_negative),
        max_connections_per_second=limits.get(
            "max_connections_per_second", float, 2000.0, _non_negative
        ),
        max_last_event_id_bytes=limits.get("max_last_event_id_bytes", int, 1024, _positive),
        max_header_bytes=limits.get("max_header_bytes", int, 8190, _positive),
        header_timeout_seconds=limits.get("header_timeout_seconds", float, 10.0, _positive),
    )
    limits.finish()

    metrics = root.table("metrics")
    metrics_listen = metrics.get(
        "listen", str, "127.0.0.1:9464", lambda v: None if v == "" else _listen(v)
    )
    metrics_config = MetricsConfig(
        enabled=metrics.get("enabled", bool, True),
        listen=_parse_listen(metrics_listen) if metrics_listen else None,
        path=metrics.get(
            "path", str, "/metrics", lambda v: None if v.startswith("/") else "must start with /"
        ),
    )
    metrics.finish()

    demo = root.table("demo")
    demo_listen = demo.get("listen", str, "127.0.0.1:8081", _listen)
    demo_config = DemoConfig(
        enabled=demo.get("enabled", bool, False),
        listen=_parse_listen(demo_listen) or Listen("127.0.0.1", 8081),
        interval_seconds=demo.get("interval_seconds", float, 1.0, _positive),
    )
    demo.finish()

    base = {name: default for name, _, default, _ in _ROUTE_OPTIONS} | {
        "cors_origins": (),
        "cors_expose_headers": (),
        "forward_headers": ("Cookie", "Authorization"),
        "upstream_ca_file": None,
        "upstream_client_cert_file": None,
        "upstream_client_key_file": None,
    }
    defaults_table = root.table("defaults")
    defaults = _read_route_options(defaults_table, base)
    defaults_table.finish()

    routes = []
    raw_routes = root.get("routes", list, [])
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table ([[routes]])")
            continue
        route = _read_route(_Table(raw, where, problems), index, defaults, environ)
        if route is not None:
            routes.append(route)
    root.finish()

    seen_names: set[str] = set()
    seen_paths: set[str] = set()
    for index, route in enumerate(routes):
        if route.name in seen_names:
            problems.append(f"routes[{index}].name: {route.name!r} is used by another route")
        shape = _PLACEHOLDER.sub("{}", route.path)
        if shape in seen_paths:
            problems.append(f"routes[{index}].path: {route.path!r} overlaps another route")
        seen_names.add(route.name)
        seen_paths.add(shape)
    reserved = {"/healthz", "/readyz", metrics_config.path, "/"}
    for index, route in enumerate(routes):
        if route.path in reserved:
            problems.append(f"routes[{index}].path: {route.path!r} is reserved by the gateway")
    if not raw_routes and not problems:
        problems.append("routes: at least one [[routes]] entry is required")
    if problems:
        raise ConfigError(problems)
    return GatewayConfig(server_config, limits_config, metrics_config, demo_config, tuple(routes))


# --- sources ----------------------------------------------------------------


def default_document() -> dict[str, Any]:
    """The embedded configuration: the demo backend behind one route."""
    text = resources.files("gateway").joinpath("default.toml").read_text("utf-8")
    return tomllib.loads(text)


def _networks(table: _Table, name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for text in table.strings(name, ()):
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:  # names the problem: "has host bits set", "does not appear..."
            table.problem(name, str(exc))
    return tuple(networks)


def _env_overrides(doc: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """`SSE_GATEWAY_SERVER_LISTEN=0.0.0.0:8080` sets `[server] listen`.

    Values are read as TOML values (`15`, `true`, `"text"`); anything that is
    not valid TOML is taken as a plain string, so `0.0.0.0:8080` needs no quotes.
    """
    sections = ("server", "limits", "metrics", "demo", "defaults")
    for var, raw in sorted(environ.items()):
        # CONFIG names the file; WORKER_INDEX is set by the supervisor for its workers.
        if not var.startswith(ENV_PREFIX) or var in (
            ENV_PREFIX + "CONFIG",
            ENV_PREFIX + "WORKER_INDEX",
        ):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            problems.append(
                f"{var}: unknown setting (expected {ENV_PREFIX}<SECTION>_<KEY>, "
                f"SECTION one of {', '.join(sections)})"
            )
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        table = doc.setdefault(section, {})
        if isinstance(table, dict):  # otherwise from_document reports the section's type
            table[rest[len(section) + 1 :]] = value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sse-gateway",
        description="A reverse-proxy gateway for Server-Sent Events. With no options it runs "
        "the embedded demo configuration.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (env: SSE_GATEWAY_CONFIG)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    parser.add_argument(
        "--path", metavar="TEMPLATE", help="quick start: downstream path, e.g. '/events/{topic}'"
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="quick start: upstream URL, e.g. 'http://127.0.0.1:9000/stream/{topic}'",
    )
    parser.add_argument(
        "--heartbeat",
        metavar="SECONDS",
        type=float,
        help="heartbeat interval for every route (0 = off)",
    )
    parser.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        action="append",
        help="allowed origin (repeatable; * for any, without credentials)",
    )
    parser.add_argument("--log-level", choices=_LOG_LEVELS)
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration, print it and exit"
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build the configuration from all sources; raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if (args.path is None) != (args.upstream is None):
        problems.append("--path and --upstream go together: give both for a quick-start route")

    doc: dict[str, Any]
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    elif args.path is not None:
        doc = {}
    else:
        doc = default_document()

    _env_overrides(doc, environ, problems)
    if not path and args.path is None:
        # The embedded demo route follows the demo listener wherever it is moved.
        demo_listen = doc.get("demo", {}).get("listen")
        if isinstance(demo_listen, str) and _parse_listen(demo_listen) is not None:
            doc["routes"][0]["upstream"] = f"http://{_parse_listen(demo_listen)}/stream/{{topic}}"
    if args.path is not None and args.upstream is not None:
        doc["routes"] = [{"name": "default", "path": args.path, "upstream": args.upstream}]
        if not path:
            doc.setdefault("demo", {})["enabled"] = False
    if args.listen is not None:
        doc.setdefault("server", {})["listen"] = args.listen
    if args.heartbeat is not None:
        doc.setdefault("defaults", {})["heartbeat_seconds"] = args.heartbeat
        for route in doc.get("routes", []):
            if isinstance(route, dict):
                route.pop("heartbeat_seconds", None)
    if args.cors_origin:
        doc.setdefault("defaults", {})["cors_origins"] = list(args.cors_origin)
        for route in doc.get("routes", []):
            if isinstance(route, dict):
                route.pop("cors_origins", None)
    if args.log_level is not None:
        doc.setdefault("server", {})["log_level"] = args.log_level
    try:
        config = from_document(doc, environ)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return config

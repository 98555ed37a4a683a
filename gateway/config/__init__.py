"""Configuration: the one place that reads files, the environment and the command line.

`load()` merges, lowest precedence first: the built-in defaults, a TOML file
(or the embedded demo configuration when no file and no quick-start route is
given), `SSE_GATEWAY_*` environment variables, then CLI flags. It returns
frozen, validated objects; every other module receives these and reads
nothing itself. Every problem found is collected into one `ConfigError`,
each line naming the key (`routes[0].heartbeat_seconds: ...`), so an operator
fixes a file in one pass.

With it in the config layer: `configtable` (the table reader and value
checks), `routeconfig` (a `[[routes]]` table) and `authconfig` (a route's
`[routes.auth]`). This module holds the other sections and the sources, and
is where every other module imports configuration from.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ConfigError
from .routes import (
    DEFAULT_PARAM_PATTERN,
    PLACEHOLDER,
    RouteConfig,
    UpstreamHeader,
    read_defaults,
    read_route,
)
from .table import IPNetwork, Table, fraction, networks, non_negative, positive, readable

# Other modules import configuration from here alone; the names defined in
# configtable, routeconfig and errors are re-exported explicitly (mypy --strict).
__all__ = [
    "DEFAULT_PARAM_PATTERN",
    "ENV_PREFIX",
    "ConfigError",
    "DemoConfig",
    "GatewayConfig",
    "IPNetwork",
    "LimitsConfig",
    "Listen",
    "MetricsConfig",
    "RouteConfig",
    "ServerConfig",
    "UpstreamHeader",
    "default_document",
    "from_document",
    "load",
    "parse_args",
]

ENV_PREFIX = "SSE_GATEWAY_"


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
    # Shared-mode topics (= upstream connections) one client address may open per second.
    topic_opens_per_client_per_second: float = 5.0
    # The share of a route's max_topics that topics opened by one client address and joined by
    # no other may hold; 1.0 = no per-client cap (behind a proxy not in trusted_proxies).
    max_topic_share_per_client: float = 0.5


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    # A separate internal listener, or None to serve `path` on the main port.
    listen: Listen | None
    path: str
    # True when no source set `listen`: then a port already taken (a second gateway on the
    # host) moves metrics to the main port instead of failing. Where the value came from,
    # not a setting, so it does not take part in equality.
    listen_is_default: bool = field(default=False, compare=False)


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


# --- reading the document ---------------------------------------------------


def _workers(table: Table) -> int:
    """`workers = N` or "auto" (one per core)."""
    table.used.add("workers")
    value = table.data.get("workers", 1)
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    table.problem("workers", f'expected a number from 1 to 256 or "auto", got {value!r}')
    return 1


def _listen(value: str) -> str | None:
    return None if _parse_listen(value) is not None else "expected HOST:PORT, e.g. 127.0.0.1:8080"


def _parse_listen(value: str) -> Listen | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Listen(host or "0.0.0.0", int(port))  # noqa: S104 - an empty host means all, as in nginx


_LOG_LEVELS = ("debug", "info", "warning", "error")


def from_document(doc: Mapping[str, Any], environ: Mapping[str, str]) -> GatewayConfig:
    """Validate a parsed TOML document (the file layout) into a GatewayConfig."""
    problems: list[str] = []
    root = Table(doc, "", problems)

    server = root.table("server")
    listen = server.get("listen", str, "127.0.0.1:8080", _listen)
    server_config = ServerConfig(
        listen=_parse_listen(listen) or Listen("127.0.0.1", 8080),
        workers=_workers(server),
        tls_cert_file=server.get("tls_cert_file", str, "", readable) or None,
        tls_key_file=server.get("tls_key_file", str, "", readable) or None,
        drain_seconds=server.get("drain_seconds", float, 5.0, non_negative),
        shutdown_timeout_seconds=server.get("shutdown_timeout_seconds", float, 10.0, non_negative),
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
        trusted_proxies=networks(server, "trusted_proxies"),
    )
    # On the given values: a file that is set but unreadable is one problem, reported above.
    if bool(server.data.get("tls_cert_file")) != bool(server.data.get("tls_key_file")):
        server.problem("tls_key_file", "goes with tls_cert_file: set both to serve HTTPS")
    server.finish()

    limits = root.table("limits")
    limits_config = LimitsConfig(
        max_subscribers=limits.get("max_subscribers", int, 20000, non_negative),
        max_subscribers_per_client=limits.get("max_subscribers_per_client", int, 64, non_negative),
        max_connections_per_second=limits.get(
            "max_connections_per_second", float, 2000.0, non_negative
        ),
        max_last_event_id_bytes=limits.get("max_last_event_id_bytes", int, 1024, positive),
        max_header_bytes=limits.get("max_header_bytes", int, 8190, positive),
        header_timeout_seconds=limits.get("header_timeout_seconds", float, 10.0, positive),
        topic_opens_per_client_per_second=limits.get(
            "topic_opens_per_client_per_second", float, 5.0, non_negative
        ),
        max_topic_share_per_client=limits.get("max_topic_share_per_client", float, 0.5, fraction),
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
        listen_is_default="listen" not in metrics.data,
    )
    metrics.finish()

    demo = root.table("demo")
    demo_listen = demo.get("listen", str, "127.0.0.1:8081", _listen)
    demo_config = DemoConfig(
        enabled=demo.get("enabled", bool, False),
        listen=_parse_listen(demo_listen) or Listen("127.0.0.1", 8081),
        interval_seconds=demo.get("interval_seconds", float, 1.0, positive),
    )
    demo.finish()

    defaults = read_defaults(root.table("defaults"))

    routes = []
    raw_routes = root.get("routes", list, [])
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table ([[routes]])")
            continue
        route = read_route(Table(raw, where, problems), index, defaults, environ)
        if route is not None:
            routes.append(route)
    root.finish()

    seen_names: set[str] = set()
    seen_paths: set[str] = set()
    for index, route in enumerate(routes):
        if route.name in seen_names:
            problems.append(f"routes[{index}].name: {route.name!r} is used by another route")
        shape = PLACEHOLDER.sub("{}", route.path)
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
    parser.add_argument(
        "--no-upstream-resume",
        action="store_true",
        help="the upstream ignores Last-Event-ID: clients the ring cannot serve get a gap event "
        "at once, with no catch-up request (every route's upstream_resume = false)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help='metrics listener ("" = on the main port); set, a port in use is an error',
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
    if args.no_upstream_resume:
        doc.setdefault("defaults", {})["upstream_resume"] = False
        for route in doc.get("routes", []):
            if isinstance(route, dict):
                route.pop("upstream_resume", None)
    if args.metrics_listen is not None:
        doc.setdefault("metrics", {})["listen"] = args.metrics_listen
    if args.log_level is not None:
        doc.setdefault("server", {})["log_level"] = args.log_level
    try:
        config = from_document(doc, environ)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return config

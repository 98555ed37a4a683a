"""The Grafana dashboard and the Prometheus alerts, against a real Prometheus scraping a gateway.

Three checks, cheapest first:

- Every metric name the dashboard, the alerts and the alert unit tests mention is one the
  gateway exports (gateway/metrics.py plus prometheus-client's process collector). No
  binary needed.
- `promtool check rules`, `promtool check config` and `promtool test rules` (the unit tests
  in prometheus/alerts_test.yml) pass.
- A live run: an in-process gateway with real traffic (subscribers, events, a leaver,
  rejections, a dead upstream, heartbeats, a replay, a catch-up, a gap, a drop) is scraped
  by a child Prometheus every second; every PromQL expression of the dashboard (panel
  targets and the route variable's query) and of the loaded alert rules is run as an
  instant query and must parse and return at least one series, and so must every metric
  selector inside it; every label it groups or matches by (`by (...)`, `on (...)`) must
  exist on one of its metrics, and every `{{label}}` of a panel's legend on every series.
  A metric or label renamed in code without the dashboard fails here. The rules, evaluated
  by that Prometheus, must be healthy, with SSEGatewayUpstreamDown pending for the dead
  route only.

Alert expressions end in a threshold (`... > 0.1`), which filters their result down to
nothing on a healthy gateway. For them the full expression is run only to prove that it
parses and evaluates; the "at least one series" check runs on the left-hand side, the
expression with its top-level comparison stripped (`strip_comparison`).

The Prometheus binaries come from the Debian package `prometheus`. Without them these tests
skip, except under CI=true, where they fail: `.ci/run` installs the package.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics

from .conftest import GatewayFactory, route_doc
from .support import Client, Upstream, connect, events, free_port, raw_request

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "sse-gateway.json"
PROMETHEUS_DIR = ROOT / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
JOB = "sse-gateway"  # the job name prometheus/prometheus.yml and the alerts use
ROUTES = ("r", "noresume", "down")

# What Grafana would substitute. `$route` as Grafana formats a multi-value selection for
# Prometheus (a regex alternation); `$__rate_interval` wide enough to span every scrape.
VARIABLES = {"route": "(" + "|".join(ROUTES) + ")", "__rate_interval": "1m"}

# Metric names in PromQL, comments and annotations: what must exist in the exposition.
METRIC_NAME = re.compile(r"(?<![\w:])(?:sse_gateway|process)_[a-z0-9_]+")
# A selector of one of those metrics, with its label matchers if any.
SELECTOR = re.compile(r"(?<![\w:])((?:sse_gateway|process)_[a-z0-9_]+)(\{[^}]*\})?")
# The labels an expression aggregates or matches by: they must exist, or the result is wrong.
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{name} not found; under CI .ci/run installs the Debian package prometheus"
            )
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def exported_names() -> dict[str, bool]:
    """Every sample name a gateway exposes once a route is in use (at 0 before any event),
    and whether it has a `route` label."""
    metrics = Metrics(CollectorRegistry())
    metrics.route("r")
    return {
        s.name: "route" in s.labels for family in metrics.registry.collect() for s in family.samples
    }


# --- extracting PromQL -----------------------------------------------------------------


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panel_exprs(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expr, legend) for every query target of every panel, rows' panels included."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"], target["legendFormat"])
        for panel in walk(doc["panels"])
        if "targets" in panel
        for target in panel["targets"]
    ]
    # Nothing elsewhere in the document holds PromQL under another shape.
    assert len(found) == sum("expr" in node for node in walk(doc)), "an expr outside a target"
    return found


def variable_queries(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, label, PromQL) for each query variable: `label_values(m, l)` runs `m`."""
    found = []
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
        assert match, f"variable {var['name']}: unsupported query {query!r}"
        found.append((var["name"], match[2], f"group by ({match[2]}) ({match[1]})"))
    return found


def substitute(expr: str) -> str:
    """Grafana's variables replaced as Grafana would; any other `$` is an unknown variable."""
    for name, value in VARIABLES.items():
        expr = re.sub(r"\$\{" + name + r"(?::\w+)?\}|\$" + name + r"\b", lambda _, v=value: v, expr)  # type: ignore[misc]
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def strip_comparison(expr: str) -> str:
    """The left-hand side of a top-level comparison (`a / b > 0.1` -> `a / b`), else `expr`.

    PromQL comparisons bind looser than arithmetic, so everything before the first
    comparison operator outside parentheses, braces, brackets and strings is its left
    operand, unless a set operator (`and`, `or`, `unless`: looser still) comes first, which
    this does not handle: such an expression fails here rather than being half-checked.
    """
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            if re.match(r"(and|or|unless)\b", expr[i:]) and not re.match(r"[\w:]", expr[i - 1]):
                raise AssertionError(f"set operator at top level, cannot strip: {expr!r}")
            if expr[i : i + 2] in ("==", "!=", ">=", "<=") or c in "<>":
                return expr[:i].strip()
        i += 1
    return expr


# --- static: names ----------------------------------------------------------------------


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    exported = exported_names()
    doc = dashboard()
    exprs = [e for _, e, _ in panel_exprs(doc)] + [q for _, _, q in variable_queries(doc)]
    assert len(exprs) >= 30
    for expr in exprs:
        names = METRIC_NAME.findall(expr)
        assert names, f"no gateway metric in {expr!r}"
        unknown = set(names) - exported.keys()
        assert not unknown, f"{sorted(unknown)} not exported by the gateway, in {expr!r}"
    for path in (ALERTS, ALERT_TESTS):
        unknown = set(METRIC_NAME.findall(path.read_text())) - exported.keys()
        assert not unknown, f"{path.name} names metrics the gateway does not export: {unknown}"
    # The dashboard is ready for file provisioning and keyed as the compose setup expects.
    assert doc["uid"] == "sse-gateway"
    assert doc["id"] is None
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "route"}
    for expr in exprs:
        if expr.startswith("group by (route)"):
            continue  # the route variable's own query
        # Each per-route selector honours the route variable, as a regex (multi-value, All).
        for name, matchers in SELECTOR.findall(expr):
            if exported[name]:
                assert 'route=~"$route"' in matchers, f"{name} not filtered by $route: {expr!r}"
        # Rate windows follow the scrape interval (Grafana's $__rate_interval).
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"fixed rate window in {expr!r}"


# --- promtool -----------------------------------------------------------------------------


def promtool(*args: str) -> str:
    result = subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


def test_promtool_checks_and_alert_unit_tests_pass(tmp_path: Path) -> None:
    promtool("check", "rules", str(ALERTS))
    # On a copy: the example's target (gateway:9464) and rule file resolve next to it.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    promtool("check", "config", str(tmp_path / "prometheus.yml"))
    promtool("test", "rules", str(ALERT_TESTS))


# --- live ---------------------------------------------------------------------------------


class Prometheus:
    """A child Prometheus on a free loopback port, and its HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, directory: Path, scrape_target: str) -> None:
        self.session, self.directory, self.target = session, directory, scrape_target
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, binary_path: str, metrics_path: str) -> None:
        # Scrape (and evaluate the rules) every second: rate() needs two samples.
        shutil.copy(ALERTS, self.directory / "alerts.yml")
        config = self.directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            f"    metrics_path: {metrics_path}\n"
            "    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                binary_path,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()  # our child, by its pid
            await self.proc.wait()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails unless it parses and evaluates."""
        async with self.session.post(self.base + "/api/v1/query", data={"query": expr}) as resp:
            body = await resp.json()
        assert body.get("status") == "success", f"{expr!r}: {body.get('error', body)}"
        assert body["data"]["resultType"] in ("vector", "scalar"), (expr, body["data"])
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def ready(self) -> bool:
        try:
            async with self.session.get(self.base + "/-/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def scraped(self, count: int) -> bool:
        up = f'count_over_time(up{{job="{JOB}"}}[1m]) >= {count} and up{{job="{JOB}"}} == 1'
        return len(await self.query(up)) == 1

    async def alerting(self, name: str, label: str) -> set[str]:
        """`label` of each pending or firing alert `name`."""
        alerts = (await self.get("/api/v1/alerts"))["alerts"]
        return {a["labels"][label] for a in alerts if a["labels"]["alertname"] == name}

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
        # Polling is the only way to follow an external process's progress (its scrapes,
        # its rule evaluations): short sleeps under a deadline.
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            assert self.proc.returncode is None, f"Prometheus exited:\n{self.tail()}"
            if await check():
                return
            assert time.monotonic() < deadline, f"Prometheus: {what} not within {timeout}s"
            await asyncio.sleep(0.2)


@dataclass
class Query:
    where: str
    full: str  # run to prove that it parses and evaluates
    lhs: str  # must return at least one series: `full` without a top-level comparison
    legend: str = ""  # a panel's legendFormat: each {{label}} must be on every series


def with_matcher(selector: str, label: str) -> str:
    matcher = f'{label}!=""'
    return (
        selector[:-1] + ", " + matcher + "}"
        if selector.endswith("}")
        else f"{selector}{{{matcher}}}"
    )


async def check(prom: Prometheus, queries: list[Query]) -> int:
    """Every query parses and has data, and so does every selector and grouping label in it."""
    selectors: set[str] = set()
    has_label: dict[tuple[str, str], bool] = {}
    for q in queries:
        await prom.query(q.full)
        result = await prom.query(q.lhs)
        assert result, f"{q.where}: no series for {q.lhs!r}"
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend):
            missing = [s["metric"] for s in result if label not in s["metric"]]
            assert not missing, f"{q.where}: legend label {label!r} missing from {missing}"
        found = [name + matchers for name, matchers in SELECTOR.findall(q.full)]
        selectors.update(found)
        # `sum by (reason)` over series without `reason` still returns a series: check that
        # each label the expression groups or matches on exists on one of its metrics.
        for group in GROUPING.findall(q.full):
            for label in re.findall(r"\w+", group):
                for selector in found:
                    if (selector, label) not in has_label:
                        count = f"count({with_matcher(selector, label)})"
                        has_label[selector, label] = bool(await prom.query(count))
                assert any(has_label[s, label] for s in found), (
                    f"{q.where}: none of {found} has the label {label!r}"
                )
    for selector in sorted(selectors):
        assert await prom.query(selector), f"no series for selector {selector!r}"
    return len(selectors)


async def publish_forever(upstream: Upstream, first_id: int) -> None:
    """Events on both topics while Prometheus scrapes, so every rate has something to show."""
    for i in range(first_id, first_id + 600):  # bounded: 60 s at most
        await upstream.publish("a", *events("a", i, 1))
        await upstream.publish("b", *events("b", i, 1))
        await asyncio.sleep(0.1)  # pacing the load, not synchronising


@pytest.mark.process
async def test_every_dashboard_and_alert_query_returns_series(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    prometheus_bin = binary("prometheus")
    doc = dashboard()
    dead = free_port()  # nothing listens there: route "down" never connects
    gw = await make_gateway(
        route_doc(upstream, heartbeat_seconds=0.2, ring_events=5, max_event_bytes=4096),
        route_doc(upstream, name="noresume", path="/noresume/{topic}", upstream_resume=False),
        {
            "name": "down",
            "path": "/down/{topic}",
            "upstream": f"http://127.0.0.1:{dead}/stream/{{topic}}",
            "reconnect_initial_seconds": 0.05,
            "reconnect_max_seconds": 0.2,
        },
        metrics={"listen": ""},  # served on the main port, scraped there
    )
    metrics_url = gw.url(gw.config.metrics.path)
    async with session.get(metrics_url) as resp:
        assert resp.status == 200, f"no metrics at {metrics_url}"

    clients: list[Client] = []
    publisher: asyncio.Task[None] | None = None
    prom = Prometheus(session, tmp_path, f"127.0.0.1:{gw.port}")
    try:
        # Subscribers on two topics, events fanned out, one subscriber leaving.
        clients += [await connect(session, gw.url("/events/a")) for _ in range(3)]
        clients += [await connect(session, gw.url("/events/b")) for _ in range(2)]
        await upstream.wait_open("a")
        await upstream.wait_open("b")
        await upstream.publish("a", *events("a", 1, 10))
        await upstream.publish("b", *events("b", 1, 10))
        for client in clients:
            await client.wait_events(10)
        clients[0].close()
        # Topic b idle: a heartbeat comes within 0.2 s.
        await clients[3].wait_for(lambda c: b"heartbeat" in c.raw)
        # An event over max_event_bytes: dropped as oversize, the stream goes on.
        await upstream.publish("b", *events("b", 11, 1, size=5000))
        # Rejections: no route (404), an invalid topic (400).
        async with session.get(gw.url("/nowhere")) as resp:
            assert resp.status == 404
        head = await raw_request(gw.port, b"GET /events/%00 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], head
        # Resume: from the ring (ids 6..10 are in it), by a catch-up (2 is older), a gap.
        hit = await connect(session, gw.url("/events/a"), headers={"Last-Event-ID": "8"})
        clients.append(hit)
        await hit.wait_events(2)
        caught_up = await connect(session, gw.url("/events/a?lastEventId=2"))
        clients.append(caught_up)
        await caught_up.wait_events(8)
        clients.append(await connect(session, gw.url("/noresume/g")))
        await upstream.wait_open("g")
        await upstream.publish("g", *events("g", 1, 3))
        gap = await connect(session, gw.url("/noresume/g"), headers={"Last-Event-ID": "old"})
        clients.append(gap)
        await gap.wait_for(lambda c: any(e.event == "gap" for e in c.events))
        # A subscriber of a route whose upstream is down: its topic stays in backoff.
        clients.append(await connect(session, gw.url("/down/x")))
        publisher = asyncio.create_task(publish_forever(upstream, 12))

        await prom.start(prometheus_bin, gw.config.metrics.path)
        await prom.until("ready", prom.ready, 15)
        await prom.until("3 scrapes of the gateway", lambda: prom.scraped(3), 20)

        # Every expression: the dashboard's panels and variables, the alerts as loaded.
        queries = [
            Query(w, substitute(e), substitute(e), legend) for w, e, legend in panel_exprs(doc)
        ]
        for name, label, expr in variable_queries(doc):
            values = {series["metric"].get(label) for series in await prom.query(expr)}
            assert values >= set(ROUTES), f"variable {name}: {values}"
            queries.append(Query(f"variable {name}", expr, expr))
        rules = [r for group in (await prom.get("/api/v1/rules"))["groups"] for r in group["rules"]]
        assert len(rules) == ALERTS.read_text().count("- alert:"), "a rule did not load"
        for rule in rules:
            expr = rule["query"]
            queries.append(Query(f"alert {rule['name']}", expr, strip_comparison(expr)))
        selectors = await check(prom, queries)

        # The rules, evaluated by Prometheus against the live gateway: without errors, and
        # the dead route (only it) alerting, pending for `for: 1m`.
        async def dead_route_alerting() -> bool:
            return "down" in await prom.alerting("SSEGatewayUpstreamDown", "route")

        await prom.until("SSEGatewayUpstreamDown for route down", dead_route_alerting, 10)
        assert await prom.alerting("SSEGatewayUpstreamDown", "route") == {"down"}
        for group in (await prom.get("/api/v1/rules"))["groups"]:
            for rule in group["rules"]:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        print(f"{len(queries)} expressions and {selectors} selectors evaluated")
    finally:
        await prom.stop()
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        for client in clients:
            client.close()

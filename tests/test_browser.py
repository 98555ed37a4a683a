"""A real browser (Debian's chromium, headless, driven by chromedriver) against the gateway.

What only a browser can tell: that a page on another origin, using the platform's own
EventSource with `withCredentials`, gets its cookie through forward auth and its events
through the CORS headers; that a page on an origin not allowed is stopped by the browser
(and by the gateway before any upstream); and that EventSource's own reconnection, with the
Last-Event-ID the browser tracks, resumes a dropped stream without a gap or a duplicate;
and that an upstream's 404 closes the browser's EventSource through the gateway, in both
modes, as it would talking to the upstream directly.

Every server is on 127.0.0.1: the gateway (in-process, on the test's loop), the SSE
upstream, a page server per origin and a forward-auth backend, each on its own port.
127.0.0.1 on different ports is cross-origin but same-site, so a SameSite=Lax cookie set
for the gateway goes out on the page's cross-origin EventSource request.

WebDriver calls block, so each one runs in a thread (`asyncio.to_thread`) while the
gateway and the upstream keep serving on the loop. Nothing is downloaded: the browser and
the driver are given by path, so Selenium Manager never runs. Without them these tests
skip, except under CI=true, where they fail: `.ci/run` installs chromium and
chromium-driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.sse import Event

from .conftest import Gateway, GatewayFactory, route_doc
from .support import Upstream, events

pytestmark = pytest.mark.process

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
CLOSED = 2  # EventSource.CLOSED

# The page: one EventSource with credentials; everything it sees is recorded on `window`
# for the test to read. `price` is a named event type, which only addEventListener gets.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sse</title></head><body>
<script>
window.__events = [];
window.__errors = [];
window.__opens = 0;
const es = new EventSource(%(url)s, {withCredentials: true});
window.__es = es;
es.onopen = () => { window.__opens += 1; };
es.onmessage = (e) => {
  window.__events.push({type: e.type, id: e.lastEventId, data: e.data});
};
es.addEventListener("price", (e) => {
  window.__events.push({type: e.type, id: e.lastEventId, data: e.data});
});
es.onerror = () => { window.__errors.push({readyState: es.readyState}); };
</script>
</body></html>
"""

STATE = """return {
  events: window.__events, errors: window.__errors, opens: window.__opens,
  readyState: window.__es.readyState
};"""


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = f"{', '.join(missing)} not found (Debian packages chromium, chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI .ci/run installs them")
        pytest.skip(message)


def start_chrome(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # Console messages (a CORS refusal is reported there) and DevTools network events (the
    # headers the browser really sent), read back with get_log("browser" | "performance").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(10)
    return driver


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[Any]:
    require_browser()
    drv = await asyncio.wait_for(asyncio.to_thread(start_chrome, tmp_path / "profile"), 30)
    try:
        yield drv
    finally:
        await asyncio.wait_for(asyncio.to_thread(drv.quit), 30)


# --- the other servers: page origins and the auth backend ---------------------------------


@dataclass
class Servers:
    runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self, app: web.Application) -> int:
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    for runner in reversed(started.runners):
        await runner.cleanup()


@dataclass
class PageServer:
    """Serves the page at `/`; the stream URL is set once the gateway's port is known."""

    port: int = 0
    stream_url: str = ""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, servers: Servers) -> PageServer:
        async def page(request: web.Request) -> web.Response:
            html = PAGE % {"url": json.dumps(self.stream_url)}
            return web.Response(text=html, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", page)
        self.port = await servers.start(app)
        return self


@dataclass
class AuthBackend:
    """Forward auth: allows a request whose Cookie carries session=good; records each call."""

    port: int = 0
    calls: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    async def start(self, servers: Servers) -> AuthBackend:
        async def check(request: web.Request) -> web.Response:
            self.calls.append(dict(request.headers))
            cookies = [c.strip() for c in request.headers.get("Cookie", "").split(";")]
            return web.Response(status=200 if "session=good" in cookies else 401)

        app = web.Application()
        app.router.add_get("/auth", check)
        self.port = await servers.start(app)
        return self


# --- driving the browser --------------------------------------------------------------------


async def browse(driver: Any, url: str) -> None:
    await asyncio.to_thread(driver.get, url)


async def set_session_cookie(driver: Any, gw: Gateway) -> None:
    # WebDriver sets cookies for the current document's host: visit the gateway (a 404 page
    # is enough), then add the cookie the forward-auth backend will look for.
    await browse(driver, gw.url("/no-such-page"))
    cookie = {"name": "session", "value": "good", "path": "/", "sameSite": "Lax"}
    await asyncio.to_thread(driver.add_cookie, cookie)


async def page_state(driver: Any) -> dict[str, Any]:
    return await asyncio.to_thread(driver.execute_script, STATE)


async def wait_page(
    driver: Any, ready: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """Poll the page's recorded state until `ready`. Polling, because the page has no way to
    wake the test: its state lives in the browser, reachable only by WebDriver round trips.
    Each poll is one cheap execute_script; the wait is bounded."""
    state: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                state = await page_state(driver)
                if ready(state):
                    return state
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"page state never got ready: {state}") from None


def received(state: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["type"], e["id"], e["data"]) for e in state["events"]]


def expected(topic: str, first: int, count: int) -> list[tuple[str, str, str]]:
    return [("message", e.id or "", e.data) for e in events(topic, first, count)]


def console(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")]


def stream_requests(driver: Any, gw: Gateway) -> list[dict[str, str]]:
    """The headers of each EventSource request the browser sent to the gateway, in order,
    as the network stack sent them (cookies and Last-Event-ID included)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSentExtraInfo":
            continue
        headers = message["params"]["headers"]
        if (
            headers.get("Host") == f"127.0.0.1:{gw.port}"
            and headers.get("Accept") == "text/event-stream"
        ):
            sent.append(headers)
    return sent


async def wait_for(predicate: Callable[[], bool], timeout: float = 5) -> None:
    # Polled: the hub's state has no change notification to wait on.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# --- the setup the allowed-origin tests share -----------------------------------------------


@dataclass
class Setup:
    gw: Gateway
    page: PageServer
    auth: AuthBackend


async def cross_origin_setup(
    upstream: Upstream, make_gateway: GatewayFactory, servers: Servers
) -> Setup:
    page = await PageServer().start(servers)
    auth = await AuthBackend().start(servers)
    gw = await make_gateway(
        route_doc(
            upstream,
            cors_origins=[page.origin],
            cors_credentials=True,
            auth={"type": "forward", "url": auth.url, "headers": ["Cookie"], "cache_seconds": 30},
            retry_ms=200,
            retry_max_ms=300,
        )
    )
    page.stream_url = gw.url("/events/t")
    return Setup(gw, page, auth)


async def open_subscribed_page(driver: Any, upstream: Upstream, setup: Setup) -> None:
    await set_session_cookie(driver, setup.gw)
    await browse(driver, setup.page.origin + "/")
    await wait_page(driver, lambda s: s["opens"] == 1)
    # The page opened once its topic's upstream answered; the gateway delivers what the
    # topic publishes from the page's request on, so from here every event reaches the page.
    await upstream.wait_open("t")


# --- tests ----------------------------------------------------------------------------------


async def test_cross_origin_page_with_cookie_receives_events_and_named_events(
    upstream: Upstream, make_gateway: GatewayFactory, servers: Servers, driver: Any
) -> None:
    setup = await cross_origin_setup(upstream, make_gateway, servers)
    await open_subscribed_page(driver, upstream, setup)

    await upstream.publish("t", *events("t", 1, 3))
    await upstream.publish("t", Event(data='{"sym": "ACME", "px": 42.5}', event="price", id="4"))
    state = await wait_page(driver, lambda s: len(s["events"]) >= 4)

    assert received(state) == [
        *expected("t", 1, 3),
        ("price", "4", '{"sym": "ACME", "px": 42.5}'),
    ]
    assert state["errors"] == []
    assert state["readyState"] == 1  # OPEN
    # The cookie went from the browser, cross-origin, through the gateway to forward auth.
    assert setup.auth.calls, "the auth backend was never asked"
    call = setup.auth.calls[0]
    assert "session=good" in call.get("Cookie", "")
    assert call.get("X-Gateway-Topic") == "t"
    assert len(upstream.connections) == 1
    (request,) = await asyncio.to_thread(stream_requests, driver, setup.gw)
    assert request["Cookie"] == "session=good"
    assert request["Origin"] == setup.page.origin
    assert "Last-Event-ID" not in request


async def test_disallowed_origin_is_refused_by_gateway_and_browser(
    upstream: Upstream, make_gateway: GatewayFactory, servers: Servers, driver: Any
) -> None:
    setup = await cross_origin_setup(upstream, make_gateway, servers)
    # The same page from an origin not in cors_origins.
    other = await PageServer(stream_url=setup.gw.url("/events/t")).start(servers)
    assert other.origin != setup.page.origin
    await set_session_cookie(driver, setup.gw)
    await browse(driver, other.origin + "/")

    # The gateway answers 403 without CORS headers; the browser fails the connection for
    # good (CLOSED, no reconnect) and the page sees only an error event.
    state = await wait_page(driver, lambda s: s["readyState"] == CLOSED and s["errors"])
    assert state["events"] == []
    assert state["opens"] == 0
    assert state["errors"][0] == {"readyState": CLOSED}
    assert setup.gw.metric("sse_gateway_requests_rejected_total", reason="cors") >= 1
    # Refused before auth and before any topic or upstream.
    assert setup.auth.calls == []
    assert setup.gw.hub.topics == {}
    assert upstream.connections == []

    # Nothing happens later either: a closed EventSource does not come back.
    rejected = setup.gw.metric("sse_gateway_requests_rejected_total", reason="cors")
    await asyncio.sleep(0.5)  # longer than the route's retry, to catch a reconnect
    state = await page_state(driver)
    assert state["readyState"] == CLOSED
    assert state["events"] == []
    assert setup.gw.metric("sse_gateway_requests_rejected_total", reason="cors") == rejected
    assert upstream.connections == []
    log = await asyncio.to_thread(console, driver)
    refusal = (
        f"Access to resource at '{setup.gw.url('/events/t')}' from origin '{other.origin}'"
        " has been blocked by CORS policy"
    )
    assert any(refusal in line for line in log), log


async def test_browser_reconnects_with_last_event_id_and_misses_nothing(
    upstream: Upstream, make_gateway: GatewayFactory, servers: Servers, driver: Any
) -> None:
    setup = await cross_origin_setup(upstream, make_gateway, servers)
    gw = setup.gw
    await open_subscribed_page(driver, upstream, setup)
    await upstream.publish("t", *events("t", 1, 3))
    await wait_page(driver, lambda s: len(s["events"]) >= 3)

    # The gateway ends the page's stream as a config reload would (with its retry hint);
    # the topic and its upstream stay, and events keep coming while the page is away.
    (topic,) = gw.hub.topics.values()
    for sub in list(topic.subscribers):
        sub.close("reload")
    await wait_for(lambda: not topic.subscribers)
    await upstream.publish("t", *events("t", 4, 3))

    # EventSource comes back by itself after the retry delay, with Last-Event-ID: 3.
    state = await wait_page(driver, lambda s: s["opens"] >= 2 and len(s["events"]) >= 6)
    await upstream.publish("t", *events("t", 7, 2))
    state = await wait_page(driver, lambda s: len(s["events"]) >= 8)

    assert received(state) == expected("t", 1, 8)  # no gap, no duplicate, in order
    assert state["opens"] == 2
    assert state["errors"] == [{"readyState": 0}]  # CONNECTING: the browser retried itself
    assert state["readyState"] == 1
    assert gw.metric("sse_gateway_replays_total", route="r", outcome="hit") >= 1
    assert gw.metric("sse_gateway_replays_total", route="r", outcome="catchup") == 0
    assert gw.metric_total("sse_gateway_gaps_total", route="r") == 0
    # The three missed events came from the gateway's ring; one upstream throughout.
    assert gw.metric("sse_gateway_replayed_events_total", route="r") == 3
    assert len(upstream.connections) == 1
    # What the browser sent: the first request without an id, the reconnect with the last
    # one it saw; both with the cookie (forward auth answered the second from its cache).
    first, again = await asyncio.to_thread(stream_requests, driver, gw)
    assert "Last-Event-ID" not in first
    assert again["Last-Event-ID"] == "3"
    assert again["Cookie"] == "session=good"
    assert len(setup.auth.calls) == 1


async def test_an_id_only_block_moves_the_browsers_last_event_id(
    upstream: Upstream, make_gateway: GatewayFactory, servers: Servers, driver: Any
) -> None:
    setup = await cross_origin_setup(upstream, make_gateway, servers)
    await open_subscribed_page(driver, upstream, setup)
    # `id: 5` and a blank line dispatch nothing but set the browser's last event id, which
    # the next event (it has no id of its own) reports, and a reconnect would send.
    await upstream.send("t", b"id: 1\ndata: a\n\nid: 5\n\ndata: b\n\n")
    state = await wait_page(driver, lambda s: len(s["events"]) >= 2)
    assert received(state) == [("message", "1", "a"), ("message", "5", "b")]


@pytest.mark.parametrize("mode", ["shared", "direct"])
async def test_an_upstream_404_closes_the_browser_eventsource_through_the_gateway(
    upstream: Upstream,
    make_gateway: GatewayFactory,
    servers: Servers,
    driver: Any,
    mode: str,
) -> None:
    # Talking to this upstream directly, EventSource fails the connection for good on its
    # 404; through the gateway it must too (issue 12), not stay open or reconnect forever.
    upstream.status = 404
    page = await PageServer().start(servers)
    gw = await make_gateway(
        route_doc(
            upstream,
            mode=mode,
            cors_origins=[page.origin],
            cors_credentials=True,
            retry_ms=200,
            retry_max_ms=300,
        )
    )
    page.stream_url = gw.url("/events/t")
    await browse(driver, page.origin + "/")

    state = await wait_page(driver, lambda s: s["readyState"] == CLOSED and s["errors"])
    assert state["opens"] == 0
    assert state["events"] == []
    assert state["errors"] == [{"readyState": CLOSED}]
    assert len(upstream.connections) == 1
    assert gw.metric("sse_gateway_requests_rejected_total", reason="upstream") == 1

    # Nothing happens later either: a closed EventSource does not come back, and the gateway
    # does not retry the upstream for it. Waited for (over the route's retry), never seen.
    with contextlib.suppress(AssertionError):
        await wait_page(driver, lambda s: s["opens"] or len(s["errors"]) > 1, timeout=0.5)
    state = await page_state(driver)
    assert state["readyState"] == CLOSED
    assert state["errors"] == [{"readyState": CLOSED}]
    assert len(upstream.connections) == 1
    assert gw.hub.topics == {}

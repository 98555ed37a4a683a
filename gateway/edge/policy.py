"""Request policy as pure decisions: CORS, the client's address and Last-Event-ID, admission.

CORS rules (Fetch standard): with an origin allow-list the exact request
origin is echoed and `Vary: Origin` is always sent, so a shared cache never
serves one origin's answer to another. `Access-Control-Allow-Credentials`
is sent only on routes that ask for it, and only with a named origin: `*`
is used only for a route that allows any origin without credentials (the
configuration refuses the combination). `https://*.example.com` allows any
subdomain. A request without `Origin` is not a CORS request and passes
untouched. A disallowed origin, `null` included, is refused with 403 before
any upstream is contacted.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import math
import re

from ..config import IPNetwork, LimitsConfig, RouteConfig
from ..core import ids
from ..errors import BadRequest, ClientLimit, CorsDenied, OverCapacity, RateLimited
from ..timing import Clock

log = logging.getLogger(__name__)

# The request headers EventSource polyfills and fetch-based clients send on a stream request.
PREFLIGHT_ALLOW_HEADERS = "Last-Event-ID, Cache-Control, Authorization"


@functools.lru_cache(maxsize=256)
def _origin_pattern(allowed: tuple[str, ...]) -> re.Pattern[str]:
    """One regex per allow-list: exact origins, and "*." standing for subdomain labels."""
    parts = []
    for origin in allowed:
        if origin == "*":
            continue
        scheme, _, host = origin.partition("://")
        if host.startswith("*."):
            parts.append(re.escape(scheme) + r"://(?:[A-Za-z0-9-]+\.)+" + re.escape(host[2:]))
        else:
            parts.append(re.escape(origin))
    return re.compile("|".join(parts) or r"(?!)", re.IGNORECASE)


def cors_headers(route: RouteConfig, origin: str | None) -> dict[str, str]:
    """The CORS response headers for a stream request, or CorsDenied."""
    allowed = route.cors_origins
    if not allowed:
        return {}
    if origin is None:
        return {"Vary": "Origin"}
    headers = {"Vary": "Origin"}
    if route.cors_expose_headers:
        headers["Access-Control-Expose-Headers"] = ", ".join(route.cors_expose_headers)
    if "*" in allowed:  # config refuses "*" together with credentials
        return headers | {"Access-Control-Allow-Origin": "*"}
    # "null" (sandboxed frames, file: pages) never matches a list of real origins.
    if origin != "null" and _origin_pattern(allowed).fullmatch(origin):
        headers["Access-Control-Allow-Origin"] = origin
        if route.cors_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers
    raise CorsDenied("origin not allowed")


def preflight_headers(route: RouteConfig, origin: str | None) -> dict[str, str]:
    headers = cors_headers(route, origin)
    if "Access-Control-Allow-Origin" not in headers:
        raise CorsDenied("origin not allowed")
    headers.pop("Access-Control-Expose-Headers", None)
    return headers | {
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": PREFLIGHT_ALLOW_HEADERS,
        "Access-Control-Max-Age": str(route.cors_max_age_seconds),
    }


def describe_cors(route: RouteConfig) -> str:
    """What a route's CORS policy lets a cross-origin page do, in a sentence for the log."""
    allowed = route.cors_origins
    if not allowed:
        return (
            "CORS off: responses carry no Access-Control-* headers, so a browser page on "
            "another origin cannot read the stream (the gateway still serves it: "
            "same-origin pages and non-browser clients get it) and its preflight gets 403"
        )
    if "*" in allowed:
        return "CORS for any origin (Access-Control-Allow-Origin: *), without credentials"
    credentials = " with credentials" if route.cors_credentials else ", without credentials"
    return f"CORS for {', '.join(allowed)}{credentials}; other origins get 403"


def client_address(
    peer: str | None, forwarded_for: list[str], trusted: tuple[IPNetwork, ...]
) -> str:
    """Who the client is: the peer, or behind a trusted proxy what the proxies say.

    Each proxy appends the address it received the request from, so X-Forwarded-For
    is read right to left and the first hop that is not a trusted proxy is the
    client; whatever is left of it the client wrote itself and proves nothing. A
    malformed hop ends the walk at the last trusted one. Hops may carry a port
    (`1.2.3.4:5678`, `[2001:db8::1]:443`); IPv4-mapped IPv6 (`::ffff:1.2.3.4`, from
    dual-stack proxies) counts as the IPv4 address it maps.
    """
    if peer is None:
        return "unknown"
    address = _ip(peer)
    if not trusted or not forwarded_for or address is None or not _in(address, trusted):
        return peer
    client = str(address)
    for hop in reversed(",".join(forwarded_for).split(",")):
        address = _ip(hop)
        if address is None:
            return client
        client = str(address)
        if not _in(address, trusted):
            return client
    return client


def trusted_peer(peer: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    """True when the socket's peer is one of `[server] trusted_proxies`."""
    address = _ip(peer) if peer is not None else None
    return address is not None and _in(address, trusted)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a proxy writes it, port or not; None for anything else.

    The result's text is a bare address literal: safe to put in a header as it is.
    """
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None  # "fe80::1%zone" may hold anything after the "%": not an address
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _in(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[IPNetwork, ...]
) -> bool:
    return any(address in network for network in networks)


def client_key(client: str) -> str:
    """Who a client is for per-client limits: its address, or for IPv6 its /64.

    Logs keep the full address; only the limits group an IPv6 prefix together.
    Anything that is not an address ("unknown") is its own key.
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, DEFAULT_IPV6_CLIENT_PREFIX), strict=False)
        return str(network)
    return client


def client_last_event_id(header: str | None, query: str | None, max_bytes: int) -> str | None:
    """The id a client resumes from: the Last-Event-ID header (EventSource sends it on
    reconnect) or else a `lastEventId` query parameter (for a first connection)."""
    value = header if header is not None else query
    if not value:
        return None
    # The rule the topic's sending side uses too (`ids.wire_id`): an id the gateway sent
    # always comes back through here.
    reason = ids.acceptable(value, max_bytes)
    if reason is not None:
        raise BadRequest(f"Last-Event-ID {reason}")
    return value


# Per-client limits count an IPv6 client by its /64: one host (a home router, a phone) is
# routinely handed a whole /64 and could otherwise mint 2**64 fresh "clients".
DEFAULT_IPV6_CLIENT_PREFIX = 64
# Share of `max_connections_per_second` one client address may use: a single address (a
# flood, a retry loop) can never take more than half, so the other half always remains for
# everyone else, while one address behind a NAT still gets a generous rate.
DEFAULT_CLIENT_RATE_SHARE = 0.5
# Per-address rate buckets kept at most. A bucket that has refilled holds no information
# and is dropped; past this bound the least recently used go first. About 100 bytes each.
DEFAULT_MAX_CLIENT_BUCKETS = 10_000
# A per-client refusal's configuration hint is logged at most this often: the first one
# tells the operator what to set, the next thousand would only fill the log.
DEFAULT_HINT_INTERVAL_SECONDS = 600.0


class TokenBucket:
    """`rate` tokens a second, bursts up to one second's worth (at least one token)."""

    __slots__ = ("tokens", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = capacity
        self.updated = now

    def refill(self, rate: float, now: float) -> float:
        """Bring the bucket up to `now`; the tokens it then holds."""
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.updated) * rate)
        self.updated = now
        return self.tokens


class Admission:
    """Who may start a stream now: subscriber counts and the new-connection rate.

    Pure bookkeeping, no I/O. Capacity limits (the process or a route full)
    answer 503, since another replica may have room; limits that single out
    one client (its address holds too many streams, or its connections arrive
    faster than its share of the rate) answer 429. Every refusal carries
    Retry-After. A limit of 0 is no limit.

    The rate is kept twice: per client (`DEFAULT_CLIENT_RATE_SHARE` of
    `max_connections_per_second`) and for the process. One client (a flood of
    bad tokens, say) can never spend more than its share, so the rest always
    remains for everyone else; and the process-wide bucket still bounds what
    every client together costs the process and the auth backends, however
    many addresses they come from. `client` here is a `client_key`.
    """

    def __init__(self, limits: LimitsConfig, clock: Clock) -> None:
        self.limits = limits
        self._clock = clock
        self._total = 0
        self._per_route: dict[str, int] = {}
        self._per_client: dict[str, int] = {}
        now = clock.now()
        self._bucket = TokenBucket(max(1.0, limits.max_connections_per_second), now)
        # Insertion order is recency order: a bucket is moved to the end when used.
        self._client_buckets: dict[str, TokenBucket] = {}
        self._hinted_at: float | None = None

    def update(self, limits: LimitsConfig) -> None:
        """A reload: new limits apply to new streams; counts carry over."""
        self.limits = limits

    @property
    def total(self) -> int:
        return self._total

    @property
    def client_buckets(self) -> int:
        return len(self._client_buckets)

    def enter(self, client: str, route: RouteConfig, *, forwarded: bool = False) -> None:
        """Admit one stream or raise; the caller must `leave` exactly once after an admit.

        `forwarded`: the request named a forwarded client that was not believed (its
        peer is not a trusted proxy), which makes a per-client refusal's hint point at
        `[server] trusted_proxies`.
        """
        limits = self.limits
        if limits.max_subscribers and self._total >= limits.max_subscribers:
            raise OverCapacity("the gateway is at its subscriber limit", headers=_retry(5))
        route_count = self._per_route.get(route.name, 0)
        if route.max_subscribers and route_count >= route.max_subscribers:
            raise OverCapacity(
                f"route {route.name!r} is at its subscriber limit", headers=_retry(5)
            )
        client_count = self._per_client.get(client, 0)
        per_client = limits.max_subscribers_per_client
        if per_client and client_count >= per_client:
            self._hint(client, forwarded, "max_subscribers_per_client")
            raise ClientLimit("too many streams from this address", headers=_retry(10))
        self._take_tokens(client, forwarded)
        self._total += 1
        self._per_route[route.name] = route_count + 1
        self._per_client[client] = client_count + 1

    def leave(self, client: str, route: RouteConfig) -> None:
        self._total -= 1
        self._per_route[route.name] -= 1
        remaining = self._per_client[client] - 1
        if remaining:
            self._per_client[client] = remaining
        else:
            del self._per_client[client]  # the map holds only addresses with streams

    def _take_tokens(self, client: str, forwarded: bool) -> None:
        """One token from the client's bucket, then one from the process's, or RateLimited."""
        rate = self.limits.max_connections_per_second
        if not rate:
            return
        now = self._clock.now()
        client_rate = rate * DEFAULT_CLIENT_RATE_SHARE
        bucket = self._client_bucket(client, client_rate, now)
        if bucket.refill(client_rate, now) < 1.0:
            self._hint(client, forwarded, "max_connections_per_second")
            raise RateLimited(
                "too many new connections from this address; retry shortly",
                headers=_retry(math.ceil((1.0 - bucket.tokens) / client_rate)),
            )
        if self._bucket.refill(rate, now) < 1.0:
            wait = math.ceil((1.0 - self._bucket.tokens) / rate)
            raise RateLimited("too many new connections; retry shortly", headers=_retry(wait))
        bucket.tokens -= 1.0
        self._bucket.tokens -= 1.0

    def _client_bucket(self, client: str, rate: float, now: float) -> TokenBucket:
        buckets = self._client_buckets
        bucket = buckets.pop(client, None)
        if bucket is None:
            if len(buckets) >= DEFAULT_MAX_CLIENT_BUCKETS:
                self._evict(rate, now)
            bucket = TokenBucket(max(1.0, rate), now)
        buckets[client] = bucket  # now the most recently used
        return bucket

    def _evict(self, rate: float, now: float) -> None:
        """Drop every bucket that has refilled (a new one would be the same), and if that
        is not enough, the least recently used, down to half the bound: the next sweep is
        then at least that many new addresses away, so a sweep costs O(1) per request."""
        full = max(1.0, rate)
        buckets = self._client_buckets
        for key in [k for k, b in buckets.items() if b.tokens + (now - b.updated) * rate >= full]:
            del buckets[key]
        excess = len(buckets) - DEFAULT_MAX_CLIENT_BUCKETS // 2
        if excess > 0:
            for key in list(itertools.islice(buckets, excess)):
                del buckets[key]

    def _hint(self, client: str, forwarded: bool, limit: str) -> None:
        """Log what to configure when a per-client limit refuses, at most once an interval.

        Behind a proxy that is not in `trusted_proxies` every client has the proxy's
        address, so the first few hundred users fill one address's allowance.
        """
        now = self._clock.now()
        if self._hinted_at is not None and now - self._hinted_at < DEFAULT_HINT_INTERVAL_SECONDS:
            return
        self._hinted_at = now
        if forwarded:
            log.warning(
                "refused %s: per-client limit [limits] %s reached; its requests carry "
                "X-Forwarded-For/Forwarded but it is not a trusted proxy, so every client "
                "behind it counts as this one address: list the proxy in "
                "[server] trusted_proxies (this hint is logged at most every %.0f s)",
                client,
                limit,
                DEFAULT_HINT_INTERVAL_SECONDS,
            )
        else:
            log.warning(
                "refused %s: per-client limit [limits] %s reached; if many users share this "
                "address (a proxy: set [server] trusted_proxies; a NAT), raise "
                "[limits] %s (this hint is logged at most every %.0f s)",
                client,
                limit,
                limit,
                DEFAULT_HINT_INTERVAL_SECONDS,
            )


def _retry(seconds: int) -> dict[str, str]:
    return {"Retry-After": str(max(1, seconds))}

"""The door: a request's head, and what the gateway decides from it before any stream starts.

Every decision at the door (the method, the route, CORS, the client's
address, the Last-Event-ID check) is a pure function of a `RequestHead`, a
plain value that any listener can build: `app.head_of` builds it from an
aiohttp request (HTTP/1.1); an HTTP/2 listener builds the same value from the
`h2` library's header list and reuses `door` unchanged. Admission and auth
take what `door` returns (the client's address, the target), not the request.
Nothing here does I/O or touches a transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from ..config import GatewayConfig
from ..core.route import RouteTable, Target
from ..errors import MethodNotAllowed
from . import policy

# The methods the stream route answers; anything else is a 405 with this Allow list.
STREAM_METHODS = ("GET", "OPTIONS")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a listener parsed from a request, before any body: plain values, no transport.

    `raw_path` is the request target as sent (percent-encoding and query string
    kept); `query` its decoded pairs in order. `peer` is the socket's remote
    address (None when unknown), `scheme` "http" or "https" as the client used
    it, `host` the Host (or HTTP/2 `:authority`) value as sent.
    """

    method: str
    raw_path: str
    query: tuple[tuple[str, str], ...]
    headers: CIMultiDictProxy[str]
    peer: str | None
    tls: bool
    scheme: str
    host: str

    @property
    def path(self) -> str:
        """The raw path without its query string (which may carry a token)."""
        return self.raw_path.partition("?")[0]

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def joined(self, name: str) -> str | None:
        """Every value of a header as one, or None: what a proxy forwards.

        A repeated header is one value joined with ", " (RFC 9110 5.3); Cookie, which
        HTTP/2 sends in crumbs, with "; " (RFC 9113 8.2.3). Forwarding only the first
        would drop what the others carry and let different credentials share one cache key.
        """
        values = self.headers.getall(name, [])
        if not values:
            return None
        return ("; " if name.lower() == "cookie" else ", ").join(values)

    def cookie(self, name: str) -> str | None:
        """A cookie's value from the Cookie headers (HTTP/2 may send several), or None.

        Parsed as browsers send it (`a=1; b=2`), values unquoted as aiohttp does; a
        malformed pair is skipped rather than failing the whole header.
        """
        for header in self.headers.getall("Cookie", []):
            for pair in header.split(";"):
                key, sep, value = pair.strip().partition("=")
                if sep and key == name:
                    value = value.strip()
                    if len(value) >= 2 and value[0] == value[-1] == '"':
                        value = value[1:-1]
                    return value
        return None

    def query_value(self, name: str) -> str | None:
        """The first value of a query parameter, as `request.query.get` gives it."""
        for key, value in self.query:
            if key == name:
                return value
        return None

    def client(self, config: GatewayConfig) -> str:
        """The client's address: the peer's, or the one trusted proxies name."""
        return policy.client_address(
            self.peer, self.headers.getall("X-Forwarded-For", []), config.server.trusted_proxies
        )

    def forwarded_untrusted(self, config: GatewayConfig) -> bool:
        """True when the request names a forwarded client that the gateway did not believe:
        the peer looks like a proxy that `[server] trusted_proxies` does not list."""
        forwarded = "X-Forwarded-For" in self.headers or "Forwarded" in self.headers
        return forwarded and not policy.trusted_peer(self.peer, config.server.trusted_proxies)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the door decided: the stream's target and everything the stream start needs.

    `preflight` marks a CORS preflight, answered 204 with `cors` and no stream.
    """

    target: Target
    cors: Mapping[str, str]
    last_event_id: str | None
    client: str
    preflight: bool = False


def door(head: RequestHead, routes: RouteTable, config: GatewayConfig, id_bytes: int = 0) -> Entry:
    """Decide on a stream request from its head alone, or raise a GatewayError (4xx).

    `id_bytes`: the longest Last-Event-ID taken, when not the configured limit (after a
    reload lowered it: ids sent before stay valid)."""
    if head.method not in STREAM_METHODS:
        raise MethodNotAllowed("only GET streams", headers={"Allow": ", ".join(STREAM_METHODS)})
    target = routes.resolve(head.raw_path, head.query)
    origin = head.header("Origin")
    client = head.client(config)
    if head.method == "OPTIONS":
        return Entry(target, policy.preflight_headers(target.route, origin), None, client, True)
    cors = policy.cors_headers(target.route, origin)
    last_event_id = policy.client_last_event_id(
        head.header("Last-Event-ID"),
        head.query_value("lastEventId"),
        max(id_bytes, config.limits.max_last_event_id_bytes),
    )
    return Entry(target, cors, last_event_id, client)

"""Route matching: a raw request path and query become a topic key and upstream URL.

Security invariants (DESIGN.md, "Security model"):
- Matching runs on the raw, still percent-encoded path, one segment at a
  time, so `%2F` can never create or remove a segment.
- Each parameter is percent-decoded, must be valid UTF-8, must fully match
  its pattern, and may never be `.` or `..` (an HTTP client would resolve
  those and escape the configured upstream path whatever the pattern says).
- The value is percent-encoded again with no safe characters before it is
  put into the upstream path; scheme, host and port come only from config.
- Only allow-listed query parameters are forwarded and take part in the
  topic key, so junk parameters cannot mint new topics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes, urlencode

from ..config import RouteConfig
from ..errors import BadRequest, NotFound

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A query value travels to the upstream and into the topic key; bound it.
MAX_QUERY_VALUE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Target:
    """What a request resolved to."""

    route: RouteConfig
    upstream_url: str
    topic_key: str
    # The decoded path parameters in path order, and the allow-listed query pairs (sorted):
    # together they name the topic for authorization.
    params: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    # Direct mode only: the headers this one client's upstream request carries.
    client_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


class CompiledRoute:
    __slots__ = ("_host_part", "_params", "_path_parts", "_upstream_parts", "config")

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self._path_parts = config.path.split("/")[1:]
        self._params = {name: re.compile(pattern) for name, pattern in config.params}
        # config guarantees "scheme://host[:port]/path" with placeholders only in the path
        slash = config.upstream.find("/", config.upstream.find("://") + 3)
        slash = len(config.upstream) if slash < 0 else slash
        self._host_part = config.upstream[:slash]
        self._upstream_parts = config.upstream[slash:].split("/")

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        """Raw segments → decoded parameters, None when the shape does not match.

        Raises BadRequest when the shape matches but a parameter is invalid.
        """
        if len(segments) != len(self._path_parts):
            return None
        values: dict[str, str] = {}
        for template, raw in zip(self._path_parts, segments, strict=True):
            found = _PLACEHOLDER.fullmatch(template)
            if found is None:
                if raw != template:
                    return None
                continue
            name = found.group(1)
            values[name] = self._decode(name, raw)
        return values

    def _decode(self, name: str, raw: str) -> str:
        try:
            value = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"path parameter {name!r} is not valid UTF-8") from None
        if value in (".", "..") or not self._params[name].fullmatch(value):
            raise BadRequest(f"path parameter {name!r} has an invalid value")
        return value

    def allowed_query(self, query: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        allowed = self.config.query
        kept = sorted((k, v) for k, v in query if k in allowed)
        for key, value in kept:
            if len(value.encode()) > MAX_QUERY_VALUE_BYTES:
                raise BadRequest(f"query parameter {key!r} is too long")
        return kept

    def upstream_url(self, values: dict[str, str], kept: list[tuple[str, str]]) -> str:
        path = "/".join(
            quote(values[m.group(1)], safe="") if (m := _PLACEHOLDER.fullmatch(p)) else p
            for p in self._upstream_parts
        )
        url = self._host_part + path
        if kept:
            url += "?" + urlencode(kept, quote_via=quote, safe="")
        return url


class RouteTable:
    """The configured routes in order; the first whose shape matches wins."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self._routes = tuple(CompiledRoute(r) for r in routes)

    def resolve(self, raw_path: str, query: Iterable[tuple[str, str]]) -> Target:
        path = raw_path.split("?", 1)[0]
        if not path.startswith("/"):
            raise NotFound("no route for this path")
        segments = path.split("/")[1:]
        for route in self._routes:
            values = route.match(segments)
            if values is not None:
                kept = route.allowed_query(query)
                url = route.upstream_url(values, kept)
                # The topic key names the route too, so two routes that share
                # an upstream URL keep their own settings and subscribers.
                return Target(
                    route.config,
                    url,
                    f"{route.config.name} {url}",
                    tuple(values.values()),
                    tuple(kept),
                )
        raise NotFound("no route for this path")

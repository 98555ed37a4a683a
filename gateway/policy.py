"""Request policy as pure decisions: CORS and the client's Last-Event-ID (limits build on this).

CORS rules (Fetch standard): with an origin allow-list the exact request
origin is echoed and `Vary: Origin` is always sent, so a shared cache never
serves one origin's answer to another; `*` is used only when the route
allows any origin (this route type never sends credentials). A request
without `Origin` is not a CORS request and passes untouched. A disallowed
origin is refused with 403 before any upstream is contacted.
"""

from __future__ import annotations

import re

from .errors import BadRequest, Forbidden

# What an id may not hold: the encoder refuses CR/LF/NUL, and other controls cannot be
# sent back to an upstream as a header value.
_BAD_ID = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

PREFLIGHT_MAX_AGE_SECONDS = 600
# The headers EventSource polyfills and fetch-based clients send on a stream request.
PREFLIGHT_ALLOW_HEADERS = "Last-Event-ID, Cache-Control, Authorization"


def cors_headers(allowed: tuple[str, ...], origin: str | None) -> dict[str, str]:
    """The CORS response headers for a stream request, or Forbidden."""
    if not allowed:
        return {}
    if origin is None:
        return {"Vary": "Origin"}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*", "Vary": "Origin"}
    if origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    raise Forbidden("origin not allowed")


def preflight_headers(allowed: tuple[str, ...], origin: str | None) -> dict[str, str]:
    headers = cors_headers(allowed, origin)
    if "Access-Control-Allow-Origin" not in headers:
        raise Forbidden("origin not allowed")
    return headers | {
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": PREFLIGHT_ALLOW_HEADERS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
    }


def client_last_event_id(header: str | None, query: str | None, max_bytes: int) -> str | None:
    """The id a client resumes from: the Last-Event-ID header (EventSource sends it on
    reconnect) or else a `lastEventId` query parameter (for a first connection)."""
    value = header if header is not None else query
    if not value:
        return None
    if len(value.encode()) > max_bytes:
        raise BadRequest(f"Last-Event-ID is longer than {max_bytes} bytes")
    if _BAD_ID.search(value):
        raise BadRequest("Last-Event-ID holds a control character")
    return value

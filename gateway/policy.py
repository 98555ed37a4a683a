"""Request policy as pure decisions: CORS for now (authorization and limits build on this).

CORS rules (Fetch standard): with an origin allow-list the exact request
origin is echoed and `Vary: Origin` is always sent, so a shared cache never
serves one origin's answer to another; `*` is used only when the route
allows any origin (this route type never sends credentials). A request
without `Origin` is not a CORS request and passes untouched. A disallowed
origin is refused with 403 before any upstream is contacted.
"""

from __future__ import annotations

from .errors import Forbidden

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

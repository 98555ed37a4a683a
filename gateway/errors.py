"""The gateway's error tree.

Every error a request can end in is a `GatewayError` subclass that carries the
HTTP status it maps to, so one middleware turns them into responses and no
handler builds an error response by hand. Messages are short and safe to show
to a client: they never contain secrets or upstream details.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error that ends a request with an HTTP status."""

    status: int = 500
    reason: str = "error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(GatewayError):
    """The request is malformed: a path parameter or query value failed validation."""

    status = 400
    reason = "bad_request"


class Forbidden(GatewayError):
    """The request is well-formed but not allowed."""

    status = 403
    reason = "forbidden"


class Unauthorized(GatewayError):
    """No credentials, or credentials that do not verify (expired, bad signature)."""

    status = 401
    reason = "auth"


class AuthDenied(Forbidden):
    """Valid credentials that may not subscribe to this topic."""

    reason = "auth"


class AuthUnavailable(GatewayError):
    """The authorization backend or key source cannot answer: fail closed."""

    status = 503
    reason = "auth_unavailable"


class CorsDenied(Forbidden):
    """The request's Origin is not on the route's list."""

    reason = "cors"


class NotFound(GatewayError):
    """No route matches the request path."""

    status = 404
    reason = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    reason = "method_not_allowed"


class OverCapacity(GatewayError):
    """The process or a route holds its maximum number of subscribers."""

    status = 503
    reason = "over_capacity"


class ClientLimit(GatewayError):
    """One client address holds its maximum number of streams."""

    status = 429
    reason = "client_limit"


class RateLimited(GatewayError):
    """New connections arrive faster than the configured rate."""

    status = 429
    reason = "rate_limit"


class TopicLimit(GatewayError):
    """A route already has its maximum number of topics open; retrying later may succeed."""

    status = 503
    reason = "topic_limit"


class UpstreamRefused(GatewayError):
    """The upstream's answer, passed to the client (README, "What reaches the browser"): its
    204 or 4xx, or 502/503/504 for a redirect, a wrong type or (direct mode) a 5xx."""

    reason = "upstream"

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status


class ConfigError(Exception):
    """A configuration that cannot be used; lists every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

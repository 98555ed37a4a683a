"""The effective configuration written back as TOML: what `sse-gateway --check` prints.

Sections and keys are the configuration file's, so the output loads again into the same
configuration (tests/test_config.py checks the round trip); every route is written whole,
with its `[defaults]` applied. Secrets never appear: a field marked `repr=False` (how the
dataclasses keep a value out of logs: JWT keys, secret header values), a header whose name
or value says it carries credentials are written as MASK, which the readers refuse (so a
copied dump fails to load, naming each key, until the secrets are back); a URL's userinfo
and query values are written as URL_MASK.

tomllib only reads, and this document is small and regular (scalars, lists of scalars,
tables, an array of route tables), so it is written here rather than with a dependency.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from . import GatewayConfig, Listen
from .routes import ROUTE_OPTIONS, RouteConfig
from .table import MASK

__all__ = ["MASK", "URL_MASK", "dump"]

# In a URL's userinfo and query: no spaces, so the URL still validates when loaded back.
URL_MASK = "***"
# Written, the listener counts as set: a port in use is then an error, not a fallback.
_DEFAULT_METRICS_NOTE = "not set: if taken at start-up, metrics are served on the main port"
# Header names that carry credentials even when written literally in the file.
_CREDENTIAL_HEADER = re.compile(
    r"auth|cookie|token|secret|key|password|passwd|session|signature|credential", re.I
)
# Header values that carry credentials whatever the header's name ("Bearer ...").
_CREDENTIAL_VALUE = re.compile(r"\s*(?:bearer|basic|digest|token|negotiate|hmac)\b", re.I)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_SHORT_ESCAPES["\r"] = "\\r"
_ROUTE_DOCS = {f.name: f.metadata["doc"] for f in ROUTE_OPTIONS if f.metadata["doc"]}
# Route fields written as their own sub-tables rather than as keys of [[routes]].
_ROUTE_TABLES = ("params", "upstream_headers", "auth")


def dump(config: GatewayConfig) -> str:
    lines = ["# sse-gateway: the effective configuration (secrets masked)"]
    for section in ("server", "limits", "metrics", "demo"):
        notes = {"listen": _DEFAULT_METRICS_NOTE} if section == "metrics" else {}
        if not config.metrics.listen_is_default:
            notes = {}
        lines += ["", f"[{section}]", *_keys(_settings(getattr(config, section)), notes)]
    for route in config.routes:
        lines += ["", "[[routes]]", *_keys(_settings(route, skip=_ROUTE_TABLES), _ROUTE_DOCS)]
        headers = {h.name: MASK if h.secret or _credential(h.name, h.value) else h.value
                   for h in route.upstream_headers}  # fmt: skip
        auth = _auth(route) if route.auth.type != "none" else {}
        for name, table in (("params", dict(route.params)), ("upstream_headers", headers)):
            if table:
                lines += ["", f"[routes.{name}]", *_keys(table)]
        if auth:
            lines += ["", "[routes.auth]", *_keys(auth)]
    return "\n".join(lines) + "\n"


def _settings(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """A config dataclass's fields by key, secrets masked.

    A field that takes no part in equality (`compare=False`) records where a value came
    from, not a setting, and is left out.
    """
    found = {}
    for f in dataclasses.fields(obj):
        if not f.compare or f.name in skip:
            continue
        value = getattr(obj, f.name)
        found[f.name] = MASK if value and (not f.repr or f.metadata.get("secret")) else value
    return found


def _auth(route: RouteConfig) -> dict[str, Any]:
    auth = route.auth
    found: dict[str, Any] = {"type": auth.type}
    detail = getattr(auth, auth.type, None)
    if detail is not None:
        # Absent, each of these reads as None; "" is not valid for all of them (jwks_url).
        found |= {k: v for k, v in _settings(detail).items() if v is not None}
        url = found.get("url") or found.get("jwks_url")
        if isinstance(url, str) and _plain_http_elsewhere(url):
            found["allow_plain_http"] = True  # it loaded: the operator allowed it
    return found


def _plain_http_elsewhere(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if not url.startswith("http://") or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _credential(header: str, value: str) -> bool:
    return bool(_CREDENTIAL_HEADER.search(header) or _CREDENTIAL_VALUE.match(value))


def _keys(table: dict[str, Any], notes: Mapping[str, str] | None = None) -> list[str]:
    notes = notes or {}
    return [
        f"{_key(name)} = {_value(value)}" + (f"  # {notes[name]}" if name in notes else "")
        for name, value in table.items()
    ]


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _value(value: Any) -> str:
    if value is None:  # optional settings: the file's "" means "not set"
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # "5.0", "1e+20", "inf", "-inf": all TOML floats
    if isinstance(value, str):
        return _string(_mask_url(value))
    if isinstance(value, Listen | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return _string(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML basic strings allow neither
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _mask_url(text: str) -> str:
    """A URL with its userinfo (user and password: either may be a token) and every query
    value masked; the upstream URL templates' `{param}` placeholders are left alone."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        masked = ":".join(URL_MASK for _ in userinfo.split(":", 1))
        netloc = f"{masked}@{host}"
    query = "&".join(
        f"{name}={URL_MASK}" if sep and value and not value.startswith("{") else pair
        for pair in parts.query.split("&")
        for name, sep, value in [pair.partition("=")]
    )
    return parts._replace(netloc=netloc, query=query).geturl()

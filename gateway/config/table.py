"""Reading one TOML table: typed keys and value checks that record problems, never raise.

`Table` is what `config`, `routeconfig` and `authconfig` read every section
through. Each problem is recorded with its key path (`routes[0].retry_ms:
...`) on a list shared by the whole document, so `config` can report every
mistake in a file at once; `finish()` flags the keys nobody asked for.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

T = TypeVar("T")
# A default no TOML value can be: "the key is absent".
MISSING: Any = object()

_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


class Table:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, data: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.problems = problems
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def get(
        self, name: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        self.used.add(name)
        value = self.data.get(name, MISSING)
        if value is MISSING:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(name, f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
            return default
        if check is not None and (message := check(value)) is not None:
            self.problem(name, message)
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, MISSING)
        if value is MISSING:
            return default
        if not all(isinstance(item, str) for item in value):
            self.problem(name, "expected a list of strings")
            return default
        return tuple(value)

    def table(self, name: str) -> Table:
        value = self.get(name, dict, {})
        return Table(value, self.key(name), self.problems)

    def finish(self) -> None:
        for name in sorted(set(self.data) - self.used):
            self.problem(name, "unknown key")


# What `--check` writes for a secret. A reader refuses it, so a dump copied into a file
# fails to load until the real secret is back, instead of running with this public string
# as an HMAC key or a header value.
MASK = "*** masked ***"
MASKED_PROBLEM = "masked by --check: put the real secret back"


def positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be 0 or greater"


def fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be greater than 0 and at most 1"


def readable(value: str) -> str | None:
    """An empty value means "not set"; any other must name a file this process can read."""
    if not value:
        return None
    return None if os.access(value, os.R_OK) else f"cannot read {value!r}"


def networks(table: Table, name: str) -> tuple[IPNetwork, ...]:
    """A list of addresses or CIDR blocks, e.g. `["10.0.0.0/8", "::1"]`."""
    found: list[IPNetwork] = []
    for text in table.strings(name, ()):
        try:
            network = ipaddress.ip_network(text)
        except ValueError as exc:  # names the problem: "has host bits set", "does not appear..."
            table.problem(name, str(exc))
            continue
        found.append(_unmapped(network))
    return tuple(found)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it maps:
    client addresses are compared as IPv4 once unmapped, so the written form must be too."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None  # inside ::ffff:0:0/96
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network

"""The import direction of DESIGN.md, enforced: nothing imports upward."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# module -> the gateway modules it may import (DESIGN.md, "Layers").
ALLOWED: dict[str, set[str]] = {
    "sse": set(),
    "errors": set(),
    "timing": set(),
    "metrics": set(),
    "configtable": set(),
    "authconfig": {"configtable"},  # for type checking only
    "routeconfig": {"authconfig", "configtable"},
    "tls": {"config"},
    "config": {"configtable", "errors", "routeconfig"},
    "auth": {"authconfig", "errors", "route", "timing"},
    "route": {"config", "errors"},
    "heartbeat": {"timing"},
    "ring": set(),
    "catchup": {"ring", "sse", "timing"},
    "topic": {"catchup", "metrics", "ring", "route", "sse", "timing"},
    "hub": {"errors", "metrics", "route", "timing", "topic"},
    "upstream": {"metrics", "route", "sse", "timing", "tls", "topic"},
    "accesslog": set(),
    "stream": {
        "accesslog",
        "errors",
        "heartbeat",
        "hub",
        "metrics",
        "route",
        "sse",
        "timing",
        "topic",
    },
    "policy": {"config", "errors", "timing"},
    "demo": {"sse"},
    "app": {
        "accesslog",
        "auth",
        "config",
        "errors",
        "heartbeat",
        "hub",
        "metrics",
        "policy",
        "route",
        "stream",
        "timing",
        "topic",
        "upstream",
    },
    "supervisor": {"config"},
    "server": {"app", "config", "demo", "errors", "supervisor", "tls"},
    "__main__": {"config", "errors", "server", "supervisor", "tls"},
    "__init__": set(),
}
# Third-party or I/O modules a layer must not touch.
FORBIDDEN: dict[str, set[str]] = {
    "sse": {"asyncio", "aiohttp"},
    "hub": {"aiohttp"},
    "topic": {"aiohttp"},
    "heartbeat": {"aiohttp"},
    "ring": {"aiohttp", "asyncio"},
    "catchup": {"aiohttp"},
    "route": {"aiohttp", "asyncio"},
    "config": {"aiohttp", "asyncio"},
    "configtable": {"aiohttp", "asyncio"},
    "routeconfig": {"aiohttp", "asyncio"},
    "authconfig": {"aiohttp", "asyncio"},
}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(gateway modules, top-level external modules) imported by a file."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    internal.add(node.module.split(".")[0])
                else:
                    internal.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("gateway"):
                parts = node.module.split(".")
                internal.add(parts[1] if len(parts) > 1 else node.names[0].name)
            elif node.module:
                external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    return internal, external


def test_every_module_is_placed_in_a_layer() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_only_downward(module: str) -> None:
    internal, external = imports_of(PACKAGE / f"{module}.py")
    assert internal <= ALLOWED[module], internal - ALLOWED[module]
    assert not external & FORBIDDEN.get(module, set())


def test_codec_uses_only_the_standard_library() -> None:
    _, external = imports_of(PACKAGE / "sse.py")
    assert external <= set(sys.stdlib_module_names) | {"__future__"}, external

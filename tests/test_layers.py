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
    "config.table": set(),
    "config.auth": {"config.table"},
    "config.routes": {"config.auth", "config.table"},
    "tls": {"config"},
    "config": {"config.table", "errors", "config.routes"},
    "config.dump": {"config", "config.routes", "config.table"},
    "edge.auth": {"config.auth", "errors", "core.route", "timing", "edge.jwks"},
    "core.route": {"config", "errors"},
    "edge.heartbeat": {"timing"},
    "core.ring": set(),
    "core.ids": set(),
    "core.catchup": {"core.ring", "sse", "timing"},
    "core.resume": {
        "core.catchup",
        "core.ids",
        "metrics",
        "core.ring",
        "core.route",
        "sse",
        "timing",
    },
    "core.answer": set(),
    "core.topic": {
        "core.answer",
        "core.catchup",
        "core.ids",
        "core.resume",
        "metrics",
        "core.ring",
        "core.route",
        "sse",
        "timing",
    },
    "core.hub": {
        "config",
        "errors",
        "metrics",
        "core.ids",
        "core.resume",
        "core.route",
        "timing",
        "core.topic",
    },
    "upstream.client": {
        "core.answer",
        "metrics",
        "core.route",
        "sse",
        "timing",
        "tls",
        "core.topic",
    },
    "edge.accesslog": set(),
    "edge.jwks": set(),
    "edge.stream": {
        "config",
        "core.answer",
        "edge.accesslog",
        "errors",
        "edge.heartbeat",
        "core.hub",
        "metrics",
        "core.route",
        "sse",
        "timing",
        "core.topic",
    },
    "edge.policy": {"config", "core.ids", "errors", "timing"},
    "edge.head": {"config", "core.route", "errors", "edge.policy"},
    "demo": {"sse"},
    "app": {
        "edge.accesslog",
        "edge.auth",
        "config",
        "errors",
        "edge.head",
        "edge.heartbeat",
        "core.hub",
        "metrics",
        "edge.policy",
        "core.route",
        "edge.stream",
        "timing",
        "core.topic",
        "upstream.client",
    },
    "process.supervisor": {"config"},
    "process.server": {"app", "config", "demo", "errors", "metrics", "process.supervisor", "tls"},
    "__main__": {"config", "config.dump", "errors", "process.server", "process.supervisor"},
    "__init__": set(),
}
# Third-party or I/O modules a layer must not touch.
FORBIDDEN: dict[str, set[str]] = {
    "sse": {"asyncio", "aiohttp"},
    "core.hub": {"aiohttp"},
    "core.topic": {"aiohttp"},
    "core.resume": {"aiohttp", "asyncio"},
    "edge.heartbeat": {"aiohttp"},
    "core.ring": {"aiohttp", "asyncio"},
    "core.answer": {"aiohttp", "asyncio"},
    "core.ids": {"aiohttp", "asyncio"},
    "core.catchup": {"aiohttp"},
    "core.route": {"aiohttp", "asyncio"},
    "config": {"aiohttp", "asyncio"},
    "config.table": {"aiohttp", "asyncio"},
    "config.routes": {"aiohttp", "asyncio"},
    "config.auth": {"aiohttp", "asyncio"},
    "config.dump": {"aiohttp", "asyncio"},
}


# Subpackages and top-level modules by layer: a module may import its own layer and below.
RANK: dict[str, int] = {
    "sse": 0,
    "errors": 0,
    "timing": 0,
    "metrics": 1,
    "config": 1,
    "tls": 2,
    "core": 3,
    "upstream": 4,
    "edge": 4,
    "demo": 4,
    "app": 5,
    "process": 6,
    "__main__": 7,
    "__init__": 0,
}


def module_of(path: Path) -> str:
    """`gateway/core/hub.py` -> "core.hub"; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> list[str]:
    return list(path.relative_to(PACKAGE).parent.parts)


def _known(dotted: str) -> str:
    """The longest module of ours that `dotted` names (an imported name may be a module)."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in ALLOWED:
            return name
        parts.pop()
    return dotted


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(gateway modules, top-level external modules) imported by a file."""
    internal: set[str] = set()
    external: set[str] = set()
    package = _package_of(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = [*base, *(node.module.split(".") if node.module else [])]
                # `from .edge import stream` names a module; `from .hub import Hub` a symbol.
                internal.update(_known(".".join([*prefix, a.name])) for a in node.names)
            elif node.module and node.module.startswith("gateway"):
                internal.add(_known(node.module.partition(".")[2] or node.names[0].name))
            elif node.module:
                external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    internal.discard(module_of(path))
    return internal, external


def _path(module: str) -> Path:
    candidate = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    return candidate if candidate.exists() else PACKAGE.joinpath(*module.split("."), "__init__.py")


def _docstring_only(path: Path) -> bool:
    return all(isinstance(n, ast.Expr) for n in ast.parse(path.read_text()).body)


def test_every_module_is_placed_in_a_layer() -> None:
    found = {
        module_of(p)
        for p in PACKAGE.rglob("*.py")
        if not (p.name == "__init__.py" and p.parent != PACKAGE and _docstring_only(p))
    }
    assert found == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_only_downward(module: str) -> None:
    internal, external = imports_of(_path(module))
    assert internal <= ALLOWED[module], internal - ALLOWED[module]
    assert not external & FORBIDDEN.get(module, set())
    rank = RANK[module.split(".")[0]]
    upward = {m for m in internal if RANK[m.split(".")[0]] > rank}
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_codec_uses_only_the_standard_library() -> None:
    _, external = imports_of(PACKAGE / "sse.py")
    assert external <= set(sys.stdlib_module_names) | {"__future__"}, external

"""Configuration: every problem named by its key; sources merged in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, from_document, load, parse_args

ROOT = Path(__file__).resolve().parent.parent


def problems(doc: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_document(doc, environ or {})
    return info.value.problems


def route(**extra: Any) -> dict[str, Any]:
    return {"path": "/e/{topic}", "upstream": "http://127.0.0.1:9000/s/{topic}", **extra}


def test_embedded_default_serves_the_demo() -> None:
    config = load(parse_args([]), {})
    assert config.demo.enabled
    assert config.routes[0].path == "/events/{topic}"
    assert config.routes[0].upstream.startswith(f"http://{config.demo.listen}/")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"routes": [route(heartbeat_seconds="often")]},
            "routes[0].heartbeat_seconds: expected a number",
        ),
        (
            {"routes": [route(heartbeat_seconds=-1)]},
            "routes[0].heartbeat_seconds: must be 0 or greater",
        ),
        ({"routes": [route(hearbeat_seconds=5)]}, "routes[0].hearbeat_seconds: unknown key"),
        ({"routes": [{"upstream": "http://h/s"}]}, "routes[0].path: is required"),
        ({"routes": [route(path="e/{topic}")]}, "routes[0].path: must start with /"),
        (
            {"routes": [route(path="/e/x{topic}")]},
            "routes[0].path: parameter must be a whole path segment",
        ),
        (
            {"routes": [route(upstream="ftp://h/{topic}")]},
            "routes[0].upstream: must be an absolute http",
        ),
        (
            {"routes": [route(upstream="http://{topic}.h/s")]},
            "routes[0].upstream: parameters may appear only in the path",
        ),
        (
            {"routes": [route(upstream="http://u:p@h/{topic}")]},
            "routes[0].upstream: credentials in the URL",
        ),
        (
            {"routes": [route(upstream="http://h/s")]},
            "routes[0].path: parameter {topic} is not used in upstream",
        ),
        (
            {"routes": [route(params={"topic": "[a-"})]},
            "routes[0].params.topic: invalid regular expression",
        ),
        ({"routes": [route(params={"other": "x"})]}, "routes[0].params.other: unknown key"),
        (
            {"routes": [route(cors_origins=["example.com"])]},
            "routes[0].cors_origins: 'example.com' is not an origin",
        ),
        (
            {"routes": [route(upstream_headers={"Bad Header": "x"})]},
            "routes[0].upstream_headers.Bad Header: not a valid header name",
        ),
        (
            {"routes": [route(upstream_headers={"Authorization": {"env": "NOPE"}})]},
            "routes[0].upstream_headers.Authorization: environment variable NOPE is not set",
        ),
        (
            {"routes": [route(name="x"), route(name="x", path="/f/{topic}")]},
            "routes[1].name: 'x' is used by another route",
        ),
        (
            {"routes": [route(name="a"), route(name="b")]},
            "routes[1].path: '/e/{topic}' overlaps another route",
        ),
        (
            {"routes": [route(path="/healthz", upstream="http://h/x")]},
            "routes[0].path: '/healthz' is reserved",
        ),
        (
            {"server": {"listen": "nowhere"}, "routes": [route()]},
            "server.listen: expected HOST:PORT",
        ),
        ({"server": {"log_level": "loud"}, "routes": [route()]}, "server.log_level: one of"),
        (
            {"defaults": {"max_unsent_bytes": 0}, "routes": [route()]},
            "defaults.max_unsent_bytes: must be greater than 0",
        ),
        (
            {"routes": [route(reconnect_initial_seconds=5, reconnect_max_seconds=1)]},
            "routes[0].reconnect_max_seconds: must not be less",
        ),
        ({"routes": [route(max_topics=0)]}, "routes[0].max_topics: must be greater than 0"),
        ({"surprise": 1, "routes": [route()]}, "surprise: unknown key"),
        ({}, "routes: at least one [[routes]] entry is required"),
    ],
)
def test_each_problem_names_its_key(doc: dict[str, Any], expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_header_values_with_control_characters_are_refused_without_echoing_secrets() -> None:
    found = problems({"routes": [route(upstream_headers={"X-A": "a\r\nX-Injected: 1"})]})
    assert found == [
        "routes[0].upstream_headers.X-A: value holds a control character (CR, LF, NUL...)"
    ]
    doc = {"routes": [route(upstream_headers={"Authorization": {"env": "TOKEN"}})]}
    found = problems(doc, {"TOKEN": "s3cret\n"})
    assert found == [
        "routes[0].upstream_headers.Authorization: TOKEN holds a control character (CR, LF, NUL...)"
    ]
    assert "s3cret" not in found[0]


def test_all_problems_are_reported_at_once() -> None:
    found = problems(
        {"server": {"listen": "x"}, "routes": [route(retry_ms=-1, linger_seconds="x")]}
    )
    assert len(found) == 3, found


def test_defaults_apply_to_routes_and_routes_override_them() -> None:
    config = from_document(
        {"defaults": {"heartbeat_seconds": 5, "retry_ms": 100}, "routes": [route(retry_ms=7)]}, {}
    )
    assert config.routes[0].heartbeat_seconds == 5.0
    assert config.routes[0].retry_ms == 7


def test_secret_header_from_environment_is_hidden_from_repr() -> None:
    doc = {
        "routes": [route(upstream_headers={"Authorization": {"env": "TOKEN", "prefix": "Bearer "}})]
    }
    config = from_document(doc, {"TOKEN": "s3cret"})
    header = config.routes[0].upstream_headers[0]
    assert header.value == "Bearer s3cret"
    assert "s3cret" not in repr(config)


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    file = tmp_path / "g.toml"
    file.write_text(
        '[server]\nlisten = "127.0.0.1:1111"\n[[routes]]\npath = "/e/{t}"\nupstream = "http://h/{t}"\n'
    )
    env = {
        "SSE_GATEWAY_SERVER_LISTEN": "127.0.0.1:2222",
        "SSE_GATEWAY_DEFAULTS_HEARTBEAT_SECONDS": "3",
    }
    config = load(parse_args(["--config", str(file)]), env)
    assert config.server.listen.port == 2222
    assert config.routes[0].heartbeat_seconds == 3.0
    config = load(
        parse_args(["--config", str(file), "--listen", "127.0.0.1:3333", "--heartbeat", "0"]), env
    )
    assert config.server.listen.port == 3333
    assert config.routes[0].heartbeat_seconds == 0.0
    assert not config.demo.enabled


def test_environment_override_into_a_malformed_section_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "g.toml"
    file.write_text('server = 5\n[[routes]]\npath = "/e/{t}"\nupstream = "http://h/{t}"\n')
    with pytest.raises(ConfigError) as info:
        load(parse_args(["--config", str(file)]), {"SSE_GATEWAY_SERVER_LISTEN": "1.2.3.4:5"})
    assert info.value.problems == ["server: expected a table, got 5"]


def test_unknown_environment_setting_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(parse_args([]), {"SSE_GATEWAY_SERVR_LISTEN": "x"})
    assert info.value.problems[0].startswith("SSE_GATEWAY_SERVR_LISTEN: unknown setting")


def test_quick_start_flags_make_one_route_without_a_file() -> None:
    args = parse_args(
        [
            "--listen",
            "127.0.0.1:8089",
            "--path",
            "/events/{topic}",
            "--upstream",
            "http://127.0.0.1:9000/stream/{topic}",
            "--heartbeat",
            "5",
            "--cors-origin",
            "https://a.example",
            "--cors-origin",
            "https://b.example",
        ]
    )
    config = load(args, {})
    assert not config.demo.enabled
    (only,) = config.routes
    assert (only.path, only.upstream, only.heartbeat_seconds) == (
        "/events/{topic}",
        "http://127.0.0.1:9000/stream/{topic}",
        5.0,
    )
    assert only.cors_origins == ("https://a.example", "https://b.example")
    assert config.server.listen.port == 8089


def test_path_without_upstream_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(parse_args(["--path", "/e/{t}"]), {})
    assert "--path and --upstream go together" in info.value.problems[0]


def test_config_examples_in_the_repository_are_valid() -> None:
    files = sorted((ROOT / "config").glob("*.toml"))
    assert files, "config/ must hold examples"
    for file in files:
        load(parse_args(["--config", str(file)]), {"BACKEND_TOKEN": "t", "JWT_KEY": "k"})


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.process
def test_bad_config_file_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(
        '[[routes]]\npath = "/e/{t}"\nupstream = "http://h/{t}"\nheartbeat_seconds = "soon"\n'
    )
    result = run_gateway("--config", str(file))
    assert result.returncode == 2
    assert "routes[0].heartbeat_seconds: expected a number" in result.stderr


@pytest.mark.process
def test_unparseable_toml_exits_non_zero(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[[routes]\n")
    result = run_gateway("--config", str(file))
    assert result.returncode == 2
    assert "invalid TOML" in result.stderr

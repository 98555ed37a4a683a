"""Configuration: every problem named by its key; sources merged in order."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    DemoConfig,
    GatewayConfig,
    LimitsConfig,
    MetricsConfig,
    RouteConfig,
    ServerConfig,
    UpstreamHeader,
    from_document,
    load,
    parse_args,
)
from gateway.config.auth import AuthConfig, ForwardAuthConfig, JwtConfig
from gateway.config.dump import MASK, URL_MASK, dump
from gateway.config.routes import ROUTE_OPTIONS
from gateway.config.table import MASKED_PROBLEM

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


# --- --check: the effective configuration as TOML ---------------------------------------


def round_trip(config: GatewayConfig) -> tuple[str, GatewayConfig]:
    """The dump, and what it loads back as once its masked secrets are filled in again.

    Loaded as it is, a dump with masked secrets is refused, naming each of them: a copied
    dump must never run with the mask as a key or a header value.
    """
    text = dump(config)
    masked = text.count(f'"{MASK}"')
    if masked:
        with pytest.raises(ConfigError) as refused:
            from_document(tomllib.loads(text), {})
        assert [p for p in refused.value.problems if p.endswith(MASKED_PROBLEM)] == (
            refused.value.problems
        )
        assert len(refused.value.problems) == masked
    return text, from_document(tomllib.loads(text.replace(f'"{MASK}"', '"restored"')), {})


@pytest.mark.parametrize("name", ["gateway.toml", "multi-route.toml", None])
def test_dump_loads_back_into_the_same_configuration(name: str | None) -> None:
    args = [] if name is None else ["--config", str(ROOT / "config" / name)]
    config = load(parse_args(args), {})
    text, again = round_trip(config)
    assert again == config, text


def test_dump_of_every_example_loads_back_without_its_secrets() -> None:
    secrets = {"BACKEND_TOKEN": "t0ken-from-env", "JWT_KEY": "hm4c-secret"}
    for file in sorted((ROOT / "config").glob("*.toml")):
        text, _ = round_trip(load(parse_args(["--config", str(file)]), secrets))
        assert not any(secret in text for secret in secrets.values()), file


def test_dump_round_trips_awkward_values_and_masks_every_secret() -> None:
    doc = {
        "server": {"trusted_proxies": ["10.0.0.0/8", "::1"], "listen": "[::1]:8443"},
        "metrics": {"listen": ""},
        "routes": [
            route(
                name="odd",
                params={"topic": r"[a-z]\d+\"é"},
                query=["q"],
                cors_origins=["https://app.example"],
                cors_credentials=True,
                upstream_headers={
                    "X-Static": 'quote " backslash \\ tab \t é',
                    "X-Api-Key": "k3y-literal",
                    "Authorization": {"env": "TOKEN", "prefix": "Bearer "},
                },
            ),
            route(
                name="jwt",
                path="/j/{topic}",
                auth={
                    "type": "jwt",
                    "key": {"env": "JWT_KEY"},
                    "jwks_url": "https://user:pa55word@id.example/jwks",
                },
            ),
            route(
                name="fwd",
                path="/f/{topic}",
                auth={
                    "type": "forward",
                    "url": "http://auth.internal/check",
                    "allow_plain_http": True,
                    "fail_open": True,
                },
            ),
        ],
    }
    config = from_document(doc, {"TOKEN": "t0ken-from-env", "JWT_KEY": "hm4c-secret"})
    text, again = round_trip(config)
    for secret in ("t0ken-from-env", "hm4c-secret", "pa55word", "k3y-literal"):
        assert secret not in text
    assert text.count(MASK) == 3
    assert f"{URL_MASK}:{URL_MASK}@id.example" in text
    # Everything but the masked values comes back as it was.
    odd, jwt, fwd = again.routes
    assert odd.upstream_headers[0] == config.routes[0].upstream_headers[0]
    assert odd.params == config.routes[0].params
    assert dataclasses.replace(odd, upstream_headers=()) == dataclasses.replace(
        config.routes[0], upstream_headers=()
    )
    assert jwt.auth.jwt is not None
    assert config.routes[1].auth.jwt is not None
    assert jwt.auth.jwt.key == "restored"
    assert dataclasses.replace(jwt.auth.jwt, key=None, jwks_url=None) == dataclasses.replace(
        config.routes[1].auth.jwt, key=None, jwks_url=None
    )
    assert fwd == config.routes[2]
    assert (again.server, again.limits, again.metrics) == (
        config.server,
        config.limits,
        config.metrics,
    )


def test_dump_masks_credentials_whatever_their_names() -> None:
    doc = {
        "routes": [
            route(
                upstream_headers={
                    "X-Auth": "Bearer b3arer",
                    "X-Signature": "s1gned",
                    "X-Plain": "Basic YmFzaWM=",
                    "X-Version": "2",
                },
                auth={
                    "type": "forward",
                    "url": "https://T0KEN@auth.example/check?apikey=QS3CRET&x={y}",
                },
            )
        ]
    }
    text, again = round_trip(from_document(doc, {}))
    for secret in ("b3arer", "s1gned", "YmFzaWM", "T0KEN", "QS3CRET"):
        assert secret not in text
    assert '"X-Version" = "2"' in text or 'X-Version = "2"' in text
    assert again.routes[0].auth.forward is not None
    assert again.routes[0].auth.forward.url == "https://***@auth.example/check?apikey=***&x={y}"


def test_a_masked_secret_copied_into_a_file_is_refused_by_name() -> None:
    doc = {"routes": [route(auth={"type": "jwt", "algorithms": ["HS256"], "key": MASK})]}
    with pytest.raises(ConfigError) as refused:
        from_document(doc, {})
    assert refused.value.problems == [f"routes[0].auth.key: {MASKED_PROBLEM}"]


CONFIG_CLASSES = (ServerConfig, LimitsConfig, MetricsConfig, DemoConfig, RouteConfig)
SECRET_NAME = re.compile(r"key|secret|password|token|credential", re.IGNORECASE)


def test_every_field_that_may_hold_a_secret_is_kept_out_of_repr_and_dump() -> None:
    # The dump masks fields marked repr=False; a new secret field must be marked too.
    classes = [*CONFIG_CLASSES, UpstreamHeader, AuthConfig, JwtConfig, ForwardAuthConfig]
    unmarked = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        # A path to a secret or a flag is not one.
        if SECRET_NAME.search(f.name) and not f.name.endswith("_file") and f.type != "bool"
        if f.repr
    ]
    assert unmarked == []


@pytest.mark.process
def test_check_prints_toml_that_loads_back(tmp_path: Path) -> None:
    result = run_gateway("--check", "--config", str(ROOT / "config" / "multi-route.toml"))
    assert result.returncode == 0, result.stderr
    file = tmp_path / "copied.toml"
    file.write_text(result.stdout)
    expected = load(parse_args(["--config", str(ROOT / "config" / "multi-route.toml")]), {})
    assert load(parse_args(["--config", str(file)]), {}) == expected


# --- one source of truth: the code's defaults, the reference file, the README -------------


def code_defaults() -> dict[str, Any]:
    """Every section at the code's defaults, as the file spells it (via --check's writer)."""
    return tomllib.loads(dump(from_document({"routes": [route()]}, {})))


ROUTE_OPTION_NAMES = [f.name for f in ROUTE_OPTIONS]


def test_reference_configuration_holds_exactly_the_code_defaults() -> None:
    reference = tomllib.loads((ROOT / "config" / "gateway.toml").read_text())
    defaults = code_defaults()
    assert set(reference) == {"server", "limits", "metrics", "demo", "defaults", "routes"}
    for section in ("server", "limits", "metrics", "demo"):
        assert reference[section] == defaults[section], section
    route_defaults = defaults["routes"][0]
    assert reference["defaults"] == {name: route_defaults[name] for name in ROUTE_OPTION_NAMES}
    (example,) = reference["routes"]
    assert set(example) <= set(route_defaults) | {"params", "upstream_headers"}


def all_keys() -> list[str]:
    defaults = code_defaults()
    keys = [f"{section}.{key}" for section in ("server", "limits", "metrics", "demo")
            for key in defaults[section]]  # fmt: skip
    route_keys = [*defaults["routes"][0], "params", "upstream_headers", "auth"]
    return keys + [f"routes.{key}" for key in route_keys]


def test_route_options_are_the_defaults_table() -> None:
    # [defaults] takes every route option and nothing else: the reader walks the fields.
    doc = {"defaults": dict.fromkeys(ROUTE_OPTION_NAMES, "x"), "routes": [route()]}
    found = problems(doc)
    assert sorted(p.split(":")[0] for p in found) == sorted(
        f"defaults.{name}" for name in ROUTE_OPTION_NAMES
    )


# Keys README.md does not name yet (README is maintained by hand): each is an expected
# failure, strict, so documenting one turns its XPASS into a reminder to drop it here.
UNDOCUMENTED: set[str] = set()


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason="not in README yet"))
        if k in UNDOCUMENTED
        else k
        for k in all_keys()
    ],
)
def test_every_key_is_named_in_the_readme(key: str) -> None:
    readme = (ROOT / "README.md").read_text()
    name = key.split(".", 1)[1]
    # In a table or prose (`name`, `[section] name = ...`) or in a TOML example (name = ...).
    assert re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`|^{name} = ", readme, re.MULTILINE), key


def test_no_upstream_resume_turns_catch_ups_off_on_every_route(tmp_path: Path) -> None:
    file = tmp_path / "g.toml"
    file.write_text(
        "[[routes]]\nname = 'a'\npath = '/a/{t}'\nupstream = 'http://h/{t}'\n"
        "upstream_resume = true\n"
        "[[routes]]\nname = 'b'\npath = '/b/{t}'\nupstream = 'http://h/{t}'\n"
    )
    assert [r.upstream_resume for r in load(parse_args(["--config", str(file)]), {}).routes] == [
        True,
        True,
    ]
    config = load(parse_args(["--config", str(file), "--no-upstream-resume"]), {})
    assert [r.upstream_resume for r in config.routes] == [False, False]
    quick = ["--path", "/e/{t}", "--upstream", "http://h/{t}", "--no-upstream-resume"]
    assert not load(parse_args(quick), {}).routes[0].upstream_resume

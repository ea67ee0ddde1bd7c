"""The container files and the CLI surface they rely on, checked without a Docker engine.

* ``docker-compose.yml``: a structural check with PyYAML that always runs (services, profiles,
  environment, and every ``command`` parsed by the settings class of its ``worker.cli`` command),
  plus ``config -q`` of ``docker-compose`` (v1, Debian's package, which ``.ci/run`` installs) or of
  ``docker compose`` when one is on PATH; neither needs an engine for ``config``. In CI a missing
  compose binary fails instead of skipping.
* ``Dockerfile`` and ``.dockerignore``: the CPU torch index comes before the project install, the
  entry point is ``python -m worker``, the user is not root, the build context keeps what it needs.
* ``python -m worker model``: ``--help`` lists the documented flags; a bad value exits 2 with a
  one-line message, not a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from worker.cli import COMMANDS, find

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_SERVICES = ("redis", "worker")  # `docker compose up redis worker`, no profile needed
SWARM_SERVICES = ("worker-2", "aggregator", "env", "control")
METRICS_SERVICES = ("prometheus",)  # profile metrics: checked by tests/test_metrics.py


# --------------------------------------------------------------------------------------- helpers


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # resolves the anchors and "<<" merge keys


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = sorted(name for name, service in SERVICES.items() if "build" in service)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, from either compose form (mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def command_words(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def settings_class(name: str) -> type:
    """The settings class of a command, whether COMMANDS holds tuples or objects with ``load()``."""
    entry = COMMANDS[name]
    return entry.load()[0] if hasattr(entry, "load") else entry[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def compose_binary() -> list[str] | None:
    """``docker-compose`` (v1) or ``docker compose`` (v2), if one is installed; None otherwise."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


# ------------------------------------------------------------------- compose: structure (always)


def test_redis_and_worker_run_without_a_profile() -> None:
    for name in BASE_SERVICES:
        assert name in SERVICES, f"service {name!r} is missing"
        assert not SERVICES[name].get("profiles"), f"{name!r} must start without --profile"


def test_every_other_service_is_in_profile_swarm() -> None:
    others = set(SERVICES) - set(BASE_SERVICES) - set(METRICS_SERVICES)
    assert others >= set(SWARM_SERVICES)
    for name in others:
        assert "swarm" in SERVICES[name].get("profiles", []), f"{name!r} is not in profile swarm"


def test_redis_service_is_durable_and_healthchecked() -> None:
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(command_words(redis))
    assert re.search(r"--appendonly\s+yes", command), "Redis must run with AOF on"
    test = redis["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in test and "ping" in test
    named = [volume.split(":", 1)[0] for volume in redis.get("volumes", []) if isinstance(volume, str)]
    assert any(volume in (COMPOSE.get("volumes") or {}) for volume in named), "no named volume for /data"


def test_worker_builds_this_repository_and_finds_redis() -> None:
    worker = SERVICES["worker"]
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert Path(context) in (Path("."), Path("./")), f"worker builds from {context!r}, not the repo root"
    env = environment(worker)
    url = urlparse(env["REDIS_URL"])
    assert url.scheme in ("redis", "rediss") and url.hostname == "redis" and "redis" in SERVICES
    assert env["COMPONENT_ID"] == "model-1"
    assert env["STREAM_PREFIX"] == "rl"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["restart"] == "unless-stopped"


def test_every_built_service_shares_build_and_environment() -> None:
    assert "x-worker-common" in COMPOSE, "the shared block is the x-worker-common extension field"
    assert set(BUILT) >= {"worker", *SWARM_SERVICES}
    for name in BUILT:
        env = environment(SERVICES[name])
        assert SERVICES[name]["build"] == SERVICES["worker"]["build"], name
        assert env["REDIS_URL"] == environment(SERVICES["worker"])["REDIS_URL"], name
        assert env["STREAM_PREFIX"] == "rl", name
    ids = [environment(SERVICES[name]).get("COMPONENT_ID") for name in ("worker", "worker-2")]
    assert ids == ["model-1", "model-2"]
    assert command_words(SERVICES["worker-2"])[0] == "model"


def test_control_runs_once_and_writes_the_curve_to_a_volume() -> None:
    control = SERVICES["control"]
    assert str(control["restart"]) == "no"
    words = command_words(control)
    assert words[:2] == ["control", "train"]
    plot = words[words.index("--plot") + 1]
    targets = [volume.split(":")[1] for volume in control.get("volumes", []) if isinstance(volume, str)]
    assert any(plot.startswith(target.rstrip("/") + "/") for target in targets), (plot, targets)


@pytest.mark.parametrize("name", [name for name in BUILT if name != "control"])
def test_service_command_is_a_worker_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_command(name, monkeypatch)


def test_control_command_is_a_worker_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check for ``control train``, kept apart on purpose: this fails until ``control``
    (``control train``) is wired into ``worker.cli.COMMANDS`` with its flags (--rounds, --steps,
    --eval-episodes, --plot)."""
    check_command("control", monkeypatch)


def check_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's first word names a command of ``python -m worker``, and its settings class
    accepts the flags and the service's environment variables (REDIS_URL, STREAM_PREFIX, ...)."""
    service = SERVICES[name]
    words = command_words(service)
    found = find(words)
    assert found is not None, f"{name}: {' '.join(words[:2])!r} names no command of worker.cli.COMMANDS"
    command, args = found
    env = environment(service)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        settings = settings_class(command)(_cli_parse_args=args)
    except SystemExit as exc:  # argparse rejected the flags
        pytest.fail(f"{name}: `python -m worker {shlex.join(words)}` does not parse (exit {exc.code})")
    if hasattr(settings, "redis_url"):
        assert settings.redis_url == env["REDIS_URL"]
    if hasattr(settings, "prefix"):
        assert settings.prefix == env["STREAM_PREFIX"]
    if "COMPONENT_ID" in env and hasattr(settings, "component_id"):
        assert settings.component_id == env["COMPONENT_ID"]


# ----------------------------------------------------------- compose: the real parser, if present


@pytest.mark.parametrize("profile", [None, "swarm"])
def test_compose_config_is_valid(profile: str | None) -> None:
    binary = compose_binary()
    if binary is None:
        message = "no docker-compose / docker compose binary (apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must validate the compose file with it")
        pytest.skip(message)
    args = [*binary, "-f", str(COMPOSE_FILE), *(["--profile", profile] if profile else []), "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(args)} failed:\n{result.stdout}{result.stderr}"


# ------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [(i, args) for i, (op, args) in enumerate(instructions) if op == "RUN"]
    torch = [i for i, args in runs if "download.pytorch.org/whl/cpu" in args and "torch" in args]
    assert torch, "no RUN pip install torch from the PyTorch CPU index"
    project = [i for i, args in runs if re.search(r"pip install\b[^&;]*\s\.(\s|$)", args)]
    assert project, "no RUN pip install ."
    assert torch[0] < project[0], "torch must come from the CPU index before the project pulls it from PyPI"
    assert not any("[test]" in args for _, args in runs), "the image installs no test extras"


def test_dockerfile_runs_python_m_worker_as_non_root() -> None:
    instructions = dockerfile_instructions()
    final = {op: args for op, args in instructions}  # the last of each instruction wins
    assert yaml.safe_load(final["ENTRYPOINT"]) == ["python", "-m", "worker"]
    assert yaml.safe_load(final["CMD"]) == ["model"]
    assert final.get("USER", "root").split(":")[0] not in ("root", "0"), "the image must not run as root"


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, pattern.removeprefix("**/")) or path == pattern for pattern in patterns)

    for path in (".git", ".pytest_cache", "rl_stream_worker.egg-info", "curve.png"):
        assert ignored(path), f"{path} is not in .dockerignore"
    copied = [args.split()[:-1] for op, args in dockerfile_instructions() if op == "COPY"]
    for path in (source for sources in copied for source in sources if not source.startswith("--")):
        assert not ignored(path), f"the Dockerfile copies {path}, which .dockerignore drops"


# ---------------------------------------------------------------------------- python -m worker


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def test_model_help_lists_the_documented_flags() -> None:
    result = run_worker("model", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--redis-url", "--component-id", "--prefix", "--n-steps", "--learning-rate"):
        assert re.search(rf"{flag}\b", result.stdout), f"{flag} is missing from model --help"


def test_model_rejects_a_bad_value_with_a_message() -> None:
    result = run_worker("model", "--n-steps", "0")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "--n-steps" in result.stderr and "greater than 0" in result.stderr, result.stderr

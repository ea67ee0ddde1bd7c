"""``python -m worker <command>``: one entry point per component, options from flags or environment.

Commands are looked up lazily (``module:attribute``), so ``--help`` of a light command does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsError

from worker.common import logs
from worker.common.connections import redacted
from worker.common.serve import OUTAGE
from worker.common.settings import CommonSettings, SpacesError


@dataclass(frozen=True)
class Command:
    """A command: its settings class, the function that runs it, one line of help."""

    settings: str  # "module:Class"
    runner: str  # "module:function", called with the parsed settings; returns the exit code
    help: str

    def load(self) -> tuple[type[BaseSettings], Any]:
        return _resolve(self.settings), _resolve(self.runner)


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _announce(settings: Any) -> None:
    """Which Redis a server uses (once it let us in): without REDIS_URL it is localhost's, which may
    not be the one meant."""
    logs.get(__name__).info("redis", url=redacted(settings.redis_url), prefix=settings.prefix)


def serve(settings: Any, service: str) -> int:
    """Build the long-running component ``service`` (``module:Class``) and serve until stopped."""
    client = connect_when_up(settings)
    _announce(settings)
    with mendable():
        _resolve(service)(settings, client).serve()
    return 0


def connect_when_up(settings: CommonSettings) -> redis.Redis:
    """A server's client, once its Redis answers: a cluster's client must reach a node to be made
    (a single server's connects on first use, and the serve loop rides out its outages)."""
    from redis.backoff import EqualJitterBackoff

    backoff = EqualJitterBackoff(cap=5.0, base=0.1)
    for attempt in itertools.count():
        try:
            return settings.connect()
        except OUTAGE as exc:
            if attempt == 0:
                logs.get(__name__).warning("redis unavailable, retrying", error=str(exc))
            time.sleep(backoff.compute(attempt))
    raise AssertionError("unreachable")


def run_model(settings: Any) -> int:
    return serve(settings, "worker.model.loop:ModelWorker")


def run_env(settings: Any) -> int:
    return serve(settings, "worker.env.runner:EnvRunner")


def run_aggregator(settings: Any) -> int:
    return serve(settings, "worker.aggregator:Aggregator")


COMMANDS: dict[str, Command] = {
    "model": Command(
        "worker.model.settings:ModelSettings",
        "worker.cli:run_model",
        "serve one model: logits for observations, online A2C, evolution hooks",
    ),
    "env": Command(
        "worker.env.runner:EnvSettings",
        "worker.cli:run_env",
        "run gymnasium environments on the actions of <prefix>:action",
    ),
    "aggregator": Command(
        "worker.aggregator:AggregatorSettings",
        "worker.cli:run_aggregator",
        "combine the models' logits into actions, track each model's contribution",
    ),
    "evolution": Command(
        "worker.evolution.settings:EvolutionSettings",
        "worker.evolution.generation:run",
        "one generation: GET the weights, select and vary, SET the next generation",
    ),
    "control train": Command(
        "worker.control.train:TrainSettings",
        "worker.control.train:run_train",
        "rounds of training episodes, evaluation and evolution, with a learning curve",
    ),
    "control status": Command(
        "worker.control.status:StatusSettings",
        "worker.control.status:run_status",
        "live models, stream lengths, consumer-group lag, pending and dead entries",
    ),
    "control forget": Command(
        "worker.control.forget:ForgetSettings",
        "worker.control.forget:run_forget",
        "delete what stopped models left in Redis: groups, state, registry entry, contribution",
    ),
    "control export": Command(
        "worker.control.export:ExportSettings",
        "worker.control.export:run_export",
        "write a model's last checkpoint as a stable-baselines3 A2C zip (A2C.load reads it)",
    ),
    "demo": Command(
        "worker.control.demo:DemoSettings",
        "worker.control.demo:run",
        "start everything (embedded Redis if none is given) and train until CartPole-v1 is solved",
    ),
}


def usage() -> str:
    lines = ["usage: python -m worker <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<15} {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def find(argv: list[str]) -> tuple[str, list[str]] | None:
    """The command named by the first one or two words of ``argv`` and the rest of it."""
    for words in (2, 1):
        if len(argv) >= words and (name := " ".join(argv[:words])) in COMMANDS:
            return name, argv[words:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    found = find(argv)
    if found is None:
        asked = any(arg in ("-h", "--help") for arg in argv[:2])
        print(usage(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    name, rest = found
    settings_class, runner = COMMANDS[name].load()
    settings_class.model_config["cli_prog_name"] = f"python -m worker {name}"
    try:
        settings = CliApp.run(settings_class, cli_args=rest)
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"]:  # a rule across options: its message names them
                print(f"error: {error.get('ctx', {}).get('error', error['msg'])}", file=sys.stderr)
                continue
            where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
            print(f"error: {where}: {error['msg']} (got {error.get('input')!r})", file=sys.stderr)
        return 2
    except SettingsError as exc:  # e.g. a flag's JSON that does not parse
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(settings, CommonSettings):
        logs.configure(settings.log_level, settings.log_json)
    try:
        code = int(runner(settings) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that left (| head) is told apart below
        return code
    except OUTAGE as exc:
        # Servers ride out outages themselves; a one-shot tool (control, evolution) says it once.
        url = redacted(getattr(settings, "redis_url", None) or "(the embedded one)")
        state = "read-only (a replica)" if isinstance(exc, redis.ReadOnlyError) else "unreachable"
        print(f"error: Redis at {url} is {state}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `control status | head`: the reader left; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


@contextmanager
def mendable() -> Iterator[None]:
    """Errors the user mends with a flag or a command (an unknown or unsupported environment, missing
    spaces, stored state of another format) stop a command with one line, not a traceback."""
    import gymnasium

    from worker.model.memory import FormatError

    try:
        yield
    except (SpacesError, FormatError, gymnasium.error.Error) as exc:
        raise SystemExit(f"error: {exc}") from None

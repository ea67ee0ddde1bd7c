"""``python -m worker <command>``: one entry point per component, options from flags or environment."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp

from worker import logs
from worker.aggregator import Aggregator, AggregatorSettings
from worker.envrunner import EnvRunner, EnvSettings
from worker.settings import CommonSettings, ModelSettings


def run_model(settings: ModelSettings) -> int:
    from worker.connections import connect
    from worker.model import ModelWorker

    ModelWorker(settings, connect(settings.redis_url)).run()
    return 0


def run_env(settings: EnvSettings) -> int:
    from worker.connections import connect

    EnvRunner(settings, connect(settings.redis_url)).serve()
    return 0


def run_aggregator(settings: AggregatorSettings) -> int:
    from worker.connections import connect

    Aggregator(settings, connect(settings.redis_url)).serve()
    return 0


COMMANDS: dict[str, tuple[type[BaseSettings], Callable[[Any], int], str]] = {
    "model": (
        ModelSettings,
        run_model,
        "serve one model: logits for observations, online A2C, evolution hooks",
    ),
    "env": (EnvSettings, run_env, "run gymnasium environments on the actions of <prefix>:action"),
    "aggregator": (AggregatorSettings, run_aggregator, "combine the models' logits into actions"),
}


def usage() -> str:
    lines = ["usage: python -m worker <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    settings_class, runner, _ = COMMANDS[name]
    settings_class.model_config["cli_prog_name"] = f"python -m worker {name}"
    try:
        settings = CliApp.run(settings_class, cli_args=rest)
    except ValidationError as exc:
        for error in exc.errors():
            where = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
            print(f"error: {where}: {error['msg']} (got {error.get('input')!r})", file=sys.stderr)
        return 2
    if isinstance(settings, CommonSettings):
        logs.configure(settings.log_level, settings.log_json)
    return runner(settings)

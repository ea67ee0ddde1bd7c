"""``python -m tests.faults.chaos``: the long form of the chaos run (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import tests.faults.chaos as package
from tests.faults.chaos.config import ChaosConfig
from tests.faults.chaos.run import run


def main(argv: list[str] | None = None) -> int:
    assert package.__doc__ is not None
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.chaos", description=package.__doc__.split("\n\n")[0]
    )
    defaults = ChaosConfig()
    parser.add_argument("--kills", type=int, default=defaults.kills, help="model worker SIGKILLs")
    parser.add_argument("--redis-restarts", type=int, default=defaults.redis_restarts)
    parser.add_argument("--aggregator-kills", type=int, default=defaults.aggregator_kills)
    parser.add_argument("--runner-kills", type=int, default=defaults.runner_kills)
    parser.add_argument(
        "--evolution-kills", type=int, default=defaults.evolution_kills, help="each one mid-generation"
    )
    parser.add_argument("--models", type=int, default=defaults.models)
    parser.add_argument("--envs", type=int, default=defaults.envs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--min-steps", type=int, default=defaults.min_steps, help="training env steps to drive at least"
    )
    parser.add_argument("--gap", type=float, nargs=2, default=defaults.gap, help="seconds between faults")
    parser.add_argument(
        "--outage", type=float, nargs=2, default=defaults.outage, help="seconds Redis is down"
    )
    parser.add_argument(
        "--round-steps", type=int, default=defaults.round_steps, help="training steps per round"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--redis-url", default=None, help="use this Redis (not restarted) instead of a private one"
    )
    parser.add_argument("--prefix", default=defaults.prefix)
    parser.add_argument("--workdir", default=None, help="keep the logs and the AOF here")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        kills=args.kills, redis_restarts=args.redis_restarts, aggregator_kills=args.aggregator_kills,
        runner_kills=args.runner_kills, evolution_kills=args.evolution_kills, models=args.models,
        envs=args.envs, seed=args.seed, min_steps=args.min_steps, gap=tuple(args.gap),
        outage=tuple(args.outage), round_steps=args.round_steps, learning_rate=args.learning_rate,
        batch_size=args.batch_size, redis_url=args.redis_url, prefix=args.prefix, workdir=args.workdir,
        verbose=not args.quiet,
    )  # fmt: skip
    figures = run(config)
    print(figures.table())
    problems = {
        key: getattr(figures, key)
        for key in ("resume_mismatches", "counter_mismatches", "crashes", "unclean_stops", "run_failures",
                    "generations_failed", "paused_at_end")
        if getattr(figures, key)
    }  # fmt: skip
    if problems:
        print(json.dumps(problems, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(figures), indent=2))
    print("OK" if figures.ok() else "FAILED")
    return 0 if figures.ok() else 1


if __name__ == "__main__":
    sys.exit(main())

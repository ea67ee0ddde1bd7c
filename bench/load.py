"""Does learning depend on machine load? The same seeds on a quiet machine and beside busy loops.

Trains the swarm (one model worker, the aggregator and one lockstep runner, as processes; ensemble
mode; CartPole-v1 with the tutorial's settings, as :mod:`bench.parity`) once per seed on a quiet
machine, then once per seed while ``--busy`` processes spin on the cores, and compares: environment
steps to solve each seed under both, whether each seed's whole learning curve (every round's
training and evaluation returns) came out the same, and the two distributions.

Every seed also seeds the actions (:mod:`worker.common.draws`: keyed by environment and step), so
a seed is one run: if it learns differently under load, something in the loop depends on timing.

    python -m bench.load [--seeds 0 1 ... 9] [--busy 2] [--steps-per-round 5000] [--max-steps 150000]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
from collections.abc import Iterator

from bench.hyperparams import SPECS
from bench.parity import Run, row, streams_curve
from worker.common import logs
from worker.control.train import RoundResult

BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` Python processes spinning until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def fingerprint(curve: list[RoundResult]) -> list[tuple[int, float, float]]:
    """What a run learned, round by round (its timings left out)."""
    return [(r.train_steps, round(r.train_return, 6), round(r.eval_return, 6)) for r in curve]


def quartiles(values: list[int]) -> str:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"median {q2:,.0f}, quartiles {q1:,.0f} / {q3:,.0f}, range {min(values):,} to {max(values):,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes of the loaded runs")
    parser.add_argument("--steps-per-round", type=int, default=5000)
    parser.add_argument("--max-steps", type=int, default=150_000, help="budget per seed")
    parser.add_argument("--mode", default="ensemble", choices=["ensemble", "direct", "local"])
    args = parser.parse_args()
    logs.configure("warning")
    spec = SPECS["CartPole-v1"]
    rounds = args.max_steps // args.steps_per_round
    run = Run(spec, spec.n_envs, args.steps_per_round, rounds, spec.eval_episodes)
    print(f"CartPole-v1, {spec.n_envs} environments, rounds of {args.steps_per_round}, at most {run.steps:,}")

    results: dict[str, dict[int, list[RoundResult]]] = {"quiet": {}, "loaded": {}}
    for condition, spinners in (("quiet", 0), ("loaded", args.busy)):
        with busy(spinners):
            for seed in args.seeds:
                curve = streams_curve(seed, run, mode=args.mode)
                results[condition][seed] = curve
                r = row(condition, seed, curve, spec.target)
                print(
                    f"{condition} seed {seed}: solved={r.solved} steps={r.steps} "
                    f"train={r.train_seconds:.1f}s",
                    flush=True,
                )

    print(f"\n| seed | quiet: steps to solve | {args.busy} busy loops: steps to solve | same curve |")
    print("|---:|---:|---:|:---:|")
    steps: dict[str, list[int]] = {"quiet": [], "loaded": []}
    same = 0
    for seed in args.seeds:
        cells = []
        for condition in ("quiet", "loaded"):
            r = row(condition, seed, results[condition][seed], spec.target)
            steps[condition].append(r.steps)
            cells.append(f"{r.steps:,}" if r.solved else f"not in {r.steps:,}")
        identical = fingerprint(results["quiet"][seed]) == fingerprint(results["loaded"][seed])
        same += identical
        print(f"| {seed} | {cells[0]} | {cells[1]} | {'yes' if identical else 'no'} |")
    print(f"\nquiet: {quartiles(steps['quiet'])}")
    print(f"loaded ({args.busy} busy loops): {quartiles(steps['loaded'])}")
    print(f"{same} of {len(args.seeds)} seeds learned exactly the same curve under load")


if __name__ == "__main__":
    main()

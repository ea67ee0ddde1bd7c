"""Does evolution help? Plain online A2C against populations with and without evolution, at equal
training environment steps.

For each environment (CartPole-v1, Acrobot-v1, with :mod:`bench.hyperparams`' settings, Acrobot's
without ``VecNormalize``: evolution leaves models that normalize their observations alone) and seed,
each arm trains the swarm (``python -m worker demo``'s processes on a private redis-server: models,
the aggregator, one lockstep runner) in rounds of ``--steps-per-round`` training steps, each followed
by a deterministic evaluation and, in the evolving arms, one generation:

1. ``one model``: one model, no evolution (plain online A2C);
2. ``4 models``: a population of 4 acting through the aggregator, no evolution;
3. ``4 models + PBT``: the same, PBT exploit/explore every round (the worst quarter takes a noisy
   copy of the best quarter's weights; fitness: each model's own deterministic returns);
4. ``4 models + GA (contribution)``: the seed's DEAP GA every round, fitness = each model's share of
   the ensemble's decisions;
5. ``4 models + GA (returns)``: the GA with fitness = each model's own deterministic returns.

Every arm steps the same environments the same number of times per round: the population's models
all learn from the ensemble's steps. Fitness by returns plays extra evaluation episodes in the
evolution process, not counted as training steps (as SB3 does not count its EvalCallback's).
Training stops once the evaluation reaches the threshold (CartPole 475, Acrobot -100). It prints,
per environment and arm, the steps to reach it, the final mean deterministic return and the
wall-clock (median and range over the seeds; an arm that does not reach it counts its budget), and
draws the evaluation curves (median and range per arm) to ``--plot``.

    python -m bench.evolution [--envs CartPole-v1 Acrobot-v1] [--seeds 0 1 2 3 4] [--arms ...]
        [--plot docs/evolution.png] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np

from bench.hyperparams import SPECS, EnvSpec
from bench.parity import Row, row
from worker.common import logs
from worker.control.demo import DemoSettings, train_swarm
from worker.control.train import RoundResult

ARMS: dict[str, dict] = {
    "one model": {"models": 1, "evolve": False},
    "4 models": {"models": 4, "evolve": False},
    "4 models + PBT": {"models": 4, "evolve": True, "algorithm": "pbt", "fitness": "returns"},
    "4 models + GA (contribution)": {
        "models": 4,
        "evolve": True,
        "algorithm": "ga",
        "fitness": "contribution",
    },
    "4 models + GA (returns)": {"models": 4, "evolve": True, "algorithm": "ga", "fitness": "returns"},
}
BUDGETS = {"CartPole-v1": (5_000, 12), "Acrobot-v1": (8_000, 6)}  # steps per round, rounds


def train_arm(spec: EnvSpec, arm: str, seed: int, steps_per_round: int, rounds: int) -> list[RoundResult]:
    """One seed of one arm: the demo's swarm for ``rounds`` rounds, or until solved."""
    settings = DemoSettings(
        _cli_parse_args=False,
        **spec.worker_settings(steps_per_round * rounds),
        **ARMS[arm],
        seed=seed,
        n_envs=spec.n_envs,
        steps=steps_per_round,
        rounds=rounds,
        eval_episodes=spec.eval_episodes,
        target=spec.target,
        progress=False,
        plot=None,
    )
    return train_swarm(settings)


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def table(outcomes: dict[str, list[Row]], arms: list[str]) -> list[str]:
    """One row per environment and arm: medians and ranges over the seeds."""
    lines = [
        "| environment | arm | reached the threshold | steps to reach it: median [range] | final mean return:"
        " median [range] | wall-clock s: median [range] |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for env_id, rows in outcomes.items():
        for arm in arms:
            mine = [o for o in rows if o.system == arm]
            if mine:
                lines.append(
                    f"| {env_id} | {arm} | {sum(o.solved for o in mine)} of {len(mine)} |"
                    f" {spread([o.steps for o in mine], ',.0f')} | {spread([o.final for o in mine], '.1f')} |"
                    f" {spread([o.seconds for o in mine], '.0f')} |"
                )
    return lines


def plot(curves: dict[tuple[str, str], list[list[RoundResult]]], path: str, budgets: dict) -> None:
    """Per environment, per arm: the median evaluation return over the seeds and its range (a run
    that stopped once solved keeps its last evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env_ids = list(dict.fromkeys(env_id for env_id, _ in curves))
    fig, axes = plt.subplots(1, len(env_ids), figsize=(6.5 * len(env_ids), 4.2), squeeze=False)
    for ax, env_id in zip(axes[0], env_ids, strict=True):
        steps_per_round, rounds = budgets[env_id]
        x = np.arange(1, rounds + 1) * steps_per_round
        arms = [(arm, runs) for (env, arm), runs in curves.items() if env == env_id]
        for arm_index, (arm, runs) in enumerate(arms):
            padded = np.array(
                [[run[min(r, len(run) - 1)].eval_return for r in range(rounds)] for run in runs]
            )
            color = f"C{arm_index}"
            ax.plot(x, np.median(padded, axis=0), color=color, label=arm)
            ax.fill_between(x, padded.min(axis=0), padded.max(axis=0), color=color, alpha=0.12)
        target = SPECS[env_id].target
        if target is not None:
            ax.axhline(target, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{env_id}: median and range over the seeds")
        ax.set_xlabel("training environment steps")
        ax.set_ylabel("mean deterministic return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--plot", default="evolution.png", help="the curves' picture")
    parser.add_argument(
        "--quick", action="store_true", help="a small form a test runs: CartPole, seed 0, 2 rounds"
    )
    args = parser.parse_args()
    budgets = dict(BUDGETS)
    if args.quick:
        args.envs, args.seeds = ["CartPole-v1"], [0]
        budgets["CartPole-v1"] = (1_000, 2)
    logs.configure("warning")
    outcomes: dict[str, list[Row]] = {}
    curves: dict[tuple[str, str], list[list[RoundResult]]] = {}
    for env_id in args.envs:
        spec, (steps_per_round, rounds) = dataclasses.replace(SPECS[env_id], normalize=False), budgets[env_id]
        for seed in args.seeds:
            for arm in args.arms:
                curve = train_arm(spec, arm, seed, steps_per_round, rounds)
                curves.setdefault((env_id, arm), []).append(curve)
                result = row(arm, seed, curve, spec.target)
                outcomes.setdefault(env_id, []).append(result)
                print(f"{env_id}, {arm}, seed {seed}: {result}", flush=True)
    print("\n".join(table(outcomes, args.arms)))
    plot(curves, args.plot, budgets)
    print(f"\ncurves: {args.plot}")


if __name__ == "__main__":
    main()

"""The same A2C in-process (SB3) and through Redis Streams (the swarm), at equal environment steps.

Both sides take one environment's settings from :mod:`bench.hyperparams` (``--env``; CartPole-v1
with the tutorial's hyper-parameters by default; Acrobot-v1 and Pendulum-v1 with RL-zoo's), the
same number of environments, the same budget of training environment steps (``--steps``) and the
same seeds. They train in rounds of ``--steps-per-round`` steps, each followed by a deterministic
evaluation; an environment with a solved threshold (CartPole 475, Acrobot -100) stops training
there. SB3 calls ``learn`` once for the whole budget (so RL-zoo's ``lin_`` learning rates fall to 0
at its end, as the worker's ``--learning-rate-schedule linear --total-timesteps``), evaluating from
a callback; with ``normalize`` its ``VecEnv`` is wrapped in ``VecNormalize`` and the evaluation
uses its statistics frozen, with raw rewards, as RL-zoo evaluates. The swarm's model normalizes
(``--normalize-obs --normalize-reward``) and leaves its statistics alone on evaluation steps.

The swarm is one model worker, the aggregator and one environment runner (``--gym-env``), as
separate processes on a private redis-server, once per client mode (``--modes``): the runner acts
through the aggregator (``ensemble``), asks the model itself (``direct``), or acts with a local copy
of its policy and streams the steps to it (``local``). The goal: each mode's mean final return
lies within SB3's spread over the seeds; with a solved threshold, each mode's median environment
steps to solve are also checked against 1.5x SB3's.

    python -m bench.parity [--env CartPole-v1] [--seeds 0 1 2 3 4] [--steps N]
        [--steps-per-round N] [--modes ensemble direct local]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import torch
from stable_baselines3 import A2C
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, sync_envs_normalization

from bench.hyperparams import SPECS, EnvSpec, spec_for
from worker.common import logs
from worker.control.demo import DemoSettings, train_swarm
from worker.control.train import RoundResult

BOUND = 1.5  # the most median environment steps to solve a mode may need, as a multiple of SB3's


@dataclass(frozen=True)
class Run:
    """What one seed of one system trains for: the same on both sides."""

    spec: EnvSpec
    n_envs: int
    steps_per_round: int
    rounds: int
    eval_episodes: int

    @property
    def steps(self) -> int:
        """The budget: most training environment steps."""
        return self.steps_per_round * self.rounds


def sb3_a2c(seed: int, n_envs: int, spec: EnvSpec = SPECS["CartPole-v1"]) -> A2C:
    """SB3's A2C with ``spec``'s hyper-parameters on ``n_envs`` of its environments (wrapped in
    ``VecNormalize`` when ``spec.normalize``).

    :param seed: seed of the weights and the environments
    :param n_envs: parallel environments
    :param spec: the environment and hyper-parameters (default: CartPole-v1, the tutorial's)
    """
    torch.set_num_threads(1)  # as the model worker: small nets run best on one thread
    env: VecEnv = make_vec_env(spec.env_id, n_envs=n_envs, seed=seed)
    if spec.normalize:
        env = VecNormalize(env, gamma=spec.gamma)  # RL-zoo's normalize: True
    return A2C("MlpPolicy", env, seed=seed, device="cpu", **spec.sb3_kwargs())


class RoundEvaluation(BaseCallback):
    """Evaluate after every ``steps_per_round`` training steps (after the update that ends the
    rollout, as separate ``learn`` calls would); stop training once ``target`` is reached.

    :param eval_env: the evaluation environment (a ``VecNormalize`` with ``training=False`` when
        the model normalizes: its statistics are synced from the training env before each evaluation)
    :param run: rounds, their steps and the evaluation episodes
    :param target: mean evaluation return that stops training; ``None``: train the whole budget
    """

    def __init__(self, eval_env: VecEnv, run: Run, target: float | None) -> None:
        super().__init__()
        self.eval_env, self.run, self.target = eval_env, run, target
        self.curve: list[RoundResult] = []
        self.started = self.eval_seconds = 0.0
        self.stop = False

    def _on_training_start(self) -> None:
        self.started = time.monotonic()

    def evaluate(self) -> None:
        """Evaluate the model now and add the point to :attr:`curve`."""
        t0 = time.monotonic()
        if isinstance(self.eval_env, VecNormalize):
            sync_envs_normalization(self.model.get_env(), self.eval_env)
        mean, _ = evaluate_policy(
            self.model, self.eval_env, n_eval_episodes=self.run.eval_episodes, deterministic=True
        )
        now = time.monotonic()
        self.eval_seconds += now - t0
        train_seconds = now - self.started - self.eval_seconds
        point = RoundResult(
            len(self.curve) + 1,
            self.model.num_timesteps,
            math.nan,
            float(mean),
            train_seconds,
            now - self.started,
        )
        self.curve.append(point)
        self.stop = self.target is not None and mean >= self.target

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps >= (len(self.curve) + 1) * self.run.steps_per_round:
            self.evaluate()

    def _on_step(self) -> bool:
        return not self.stop

    def _on_training_end(self) -> None:
        if not self.stop and (not self.curve or self.curve[-1].train_steps < self.model.num_timesteps):
            self.evaluate()  # the last round: learn() ends after its update, without a new rollout


def sb3_curve(seed: int, run: Run) -> list[RoundResult]:
    """Train SB3's A2C in-process for ``run``'s budget; its evaluation after each round.

    :param seed: seed of the weights and the environments (evaluation: ``seed + 10_000``)
    :param run: the environment, hyper-parameters and budget
    """
    spec = run.spec
    model = sb3_a2c(seed, run.n_envs, spec)
    eval_env: VecEnv = make_vec_env(spec.env_id, n_envs=1, seed=seed + 10_000)
    if spec.normalize:  # the training statistics, frozen, and raw rewards: as RL-zoo evaluates
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False, gamma=spec.gamma)
    callback = RoundEvaluation(eval_env, run, spec.target)
    model.learn(run.steps, callback=callback)
    return callback.curve


def streams_curve(seed: int, run: Run, mode: str = "ensemble") -> list[RoundResult]:
    """Train the swarm (one model worker, the aggregator, one runner) for ``run``'s budget.

    :param seed: seed of the model's weights and of the runner's environments
    :param run: the environment, hyper-parameters and budget
    :param mode: the runner's client mode: ensemble, direct or local
    """
    spec = run.spec
    settings = DemoSettings(
        **spec.worker_settings(run.steps),
        models=1,
        mode=mode,
        evolve=False,
        seed=seed,
        n_envs=run.n_envs,
        steps=run.steps_per_round,
        rounds=run.rounds,
        eval_episodes=run.eval_episodes,
        target=spec.target,
        progress=False,
    )
    return train_swarm(settings)


@dataclass(frozen=True)
class Row:
    """One seed of one system."""

    system: str
    seed: int
    solved: bool
    steps: int  # training environment steps used (to solve, if solved)
    final: float  # the last evaluation's mean return
    train_seconds: float
    seconds: float  # evaluations included


def row(system: str, seed: int, curve: list[RoundResult], target: float | None) -> Row:
    """Summarize one curve.

    :param system: the system's name
    :param seed: the seed it ran with
    :param curve: its evaluation after each round
    :param target: the solved threshold, if any
    """
    last = curve[-1]
    solved = target is not None and last.eval_return >= target
    return Row(system, seed, solved, last.train_steps, last.eval_return, last.train_seconds, last.seconds)


def plot(curves: list[tuple[str, int, list[RoundResult]]], path: str, run: Run) -> None:
    """Deterministic evaluation return against training steps: one line per system and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    palette = iter(["tab:orange", "tab:blue", "tab:green", "tab:red"])
    names = dict.fromkeys(name for name, _, _ in curves)  # each system once, in order
    colors = {name: "tab:gray" if name.startswith("SB3") else next(palette) for name in names}
    for name, seed, curve in curves:
        label = name if seed == curves[0][1] else None
        steps, returns = [p.train_steps for p in curve], [p.eval_return for p in curve]
        ax.plot(steps, returns, color=colors[name], marker=".", alpha=0.8, label=label)
    if run.spec.target is not None:
        ax.axhline(run.spec.target, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("environment steps (training)")
    ax.set_ylabel(f"mean return, {run.eval_episodes} deterministic episodes")
    ax.set_title(f"{run.spec.env_id}, same A2C: in-process SB3 vs through Redis Streams")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list[Row], systems: list[str], run: Run) -> None:
    """Print the per-seed table, the final returns' spread per system and the verdicts.

    :param rows: every seed of every system
    :param systems: the systems' names, SB3 first
    :param run: what they trained for
    """
    target = run.spec.target
    solved_at = f", solved at >= {target:.0f}" if target is not None else ", no solved threshold"
    print(
        f"\n{run.spec.env_id}, {run.n_envs} environments, evaluation every {run.steps_per_round} steps "
        f"({run.eval_episodes} deterministic episodes{solved_at}), budget {run.steps} steps\n"
    )
    steps_header = "env steps to solve" if target is not None else "env steps"
    print(f"| system | seed | solved | {steps_header} | training s | total s (with evaluation) |")
    print("|---|---:|:---:|---:|---:|---:|")
    for r in rows:
        solved = ("yes" if r.solved else "no") if target is not None else "n/a"
        print(f"| {r.system} | {r.seed} | {solved} | {r.steps} | {r.train_seconds:.1f} | {r.seconds:.1f} |")
    for name in systems:
        mine = [r for r in rows if r.system == name]
        solved = f"{sum(r.solved for r in mine)}/{len(mine)}" if target is not None else "n/a"
        print(
            f"| **{name}, median** | | {solved} "
            f"| {statistics.median(r.steps for r in mine):.0f} "
            f"| {statistics.median(r.train_seconds for r in mine):.1f} "
            f"| {statistics.median(r.seconds for r in mine):.1f} |"
        )

    print(f"\nFinal mean return over the seeds ({run.eval_episodes} deterministic episodes per seed):\n")
    print("| system | seeds | mean | std | min | max | env steps (mean) | wall-clock s (all seeds) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in systems:
        finals = [r.final for r in rows if r.system == name]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        steps = statistics.mean(r.steps for r in rows if r.system == name)
        seconds = sum(r.seconds for r in rows if r.system == name)
        print(
            f"| {name} | {len(finals)} | {statistics.mean(finals):.1f} | {std:.1f} | {min(finals):.1f} "
            f"| {max(finals):.1f} | {steps:.0f} | {seconds:.1f} |"
        )

    sb3 = [r for r in rows if r.system == systems[0]]
    low, high = min(r.final for r in sb3), max(r.final for r in sb3)
    print()
    for name in systems[1:]:
        ours = [r for r in rows if r.system == name]
        mean = statistics.mean(r.final for r in ours)
        verdict = "within" if low <= mean <= high else "OUTSIDE"
        line = f"{name}: mean final return {mean:.1f}, {verdict} SB3's seed spread [{low:.1f}, {high:.1f}]"
        if target is not None:
            step_ratio = statistics.median(r.steps for r in ours) / statistics.median(r.steps for r in sb3)
            bound = "within" if step_ratio <= BOUND else "OVER"
            line += f"; median env steps / SB3's {step_ratio:.2f}x ({bound} the {BOUND}x bound)"
        time_ratio = statistics.median(r.train_seconds for r in ours) / statistics.median(
            r.train_seconds for r in sb3
        )
        print(f"{line}; median training wall-clock {time_ratio:.2f}x")


def budget(args: argparse.Namespace, spec: EnvSpec) -> Run:
    """The rounds to train from the command line and the environment's defaults.

    :param args: ``--steps``, ``--steps-per-round``, ``--max-rounds``, ``--n-envs``, ``--eval-episodes``
    :param spec: the environment's settings
    """
    steps_per_round = args.steps_per_round or spec.steps_per_round
    if args.steps is not None:
        total = args.steps
    elif args.max_rounds is not None:
        total = args.max_rounds * steps_per_round
    else:
        total = spec.steps
    rounds = math.ceil(total / steps_per_round)  # rounds of equal steps, the budget spread over them
    return Run(
        spec,
        n_envs=args.n_envs or spec.n_envs,
        steps_per_round=math.ceil(total / rounds),
        rounds=rounds,
        eval_episodes=args.eval_episodes or spec.eval_episodes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--env",
        default="CartPole-v1",
        help=f"gymnasium env id: {', '.join(SPECS)} with bench.hyperparams' settings, others SB3's defaults",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, help="budget: training env steps per seed (default: the env's)")
    parser.add_argument("--n-envs", type=int, help="parallel environments (default: the env's)")
    parser.add_argument(
        "--steps-per-round", type=int, help="env steps between evaluations (default: the env's)"
    )
    parser.add_argument("--max-rounds", type=int, help="or: budget in rounds, when --steps is not given")
    parser.add_argument("--eval-episodes", type=int, help="deterministic episodes per evaluation")
    modes = ["ensemble", "direct", "local"]
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes, help="the swarm's client modes")
    parser.add_argument("--plot", default="parity.png", help="evaluation curves of every system, every seed")
    args = parser.parse_args()
    logs.configure("warning")
    try:
        spec = spec_for(args.env)
    except gym.error.Error as exc:
        parser.error(f"--env {args.env}: {exc}")
    run = budget(args, spec)
    print(
        f"{run.spec.env_id}: {run.spec.source}; {run.rounds} rounds of {run.steps_per_round} steps",
        flush=True,
    )

    systems: list[tuple[str, Callable[[int, Run], list[RoundResult]]]] = [("SB3 A2C in-process", sb3_curve)]
    systems += [(f"streams, {mode}", functools.partial(streams_curve, mode=mode)) for mode in args.modes]
    rows, curves = [], []
    for seed in args.seeds:
        for name, fn in systems:
            curve = fn(seed, run)
            curves.append((name, seed, curve))
            r = row(name, seed, curve, run.spec.target)
            rows.append(r)
            print(
                f"{name:<24} seed {seed}: solved={r.solved} steps={r.steps} final={r.final:.1f} "
                f"train={r.train_seconds:.1f}s total={r.seconds:.1f}s",
                flush=True,
            )
    report(rows, [name for name, _ in systems], run)
    plot(curves, args.plot, run)
    print(f"\ncurves: {args.plot}")


if __name__ == "__main__":
    main()

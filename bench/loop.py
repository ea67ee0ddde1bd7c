"""The whole loop against in-process stable-baselines3 on environments that cost time to step.

``python -m bench.loop [--costs 0:none 1:wait 1:cpu 10:wait] [--seeds 0 1 2 3 4] [--seeds-slow 0 1 2]
[--n-envs 32] [--systems swarm dummy subproc] [--steps-per-round 10000] [--rounds 10]
[--learning-rate 5e-3] [--segments-per-update N] [--quick]``

Real environments cost far more than CartPole's 13 µs per step: a physics simulator 0.1 to 10 ms
of CPU, a remote game or robot milliseconds of waiting. Every environment here is CartPole-v1
wrapped in :class:`worker.env.cost.StepCost` (``cost_ms`` of CPU work or of waiting per step), on
every side (evaluation aside: it is not timed, and SB3's plays without the cost). For each cost and
seed, three systems train the same A2C (:mod:`bench.hyperparams`' CartPole-v1 settings but
``--learning-rate``, 5e-3: with 32 environments the tutorial's 7e-4 needs some 200,000 steps;
``--n-envs`` environments) until the mean deterministic return over 20 episodes reaches 475,
evaluated every ``--steps-per-round`` steps:

- **swarm**: one model worker (answering the runners directly; one update per ``--n-envs``
  completed segments, as SB3 updates on a rollout of n_envs segments: ``--segments-per-update``),
  and the environments on runner processes stepping asynchronously (each environment steps as soon
  as its own action arrives): one runner
  with a thread per environment when the cost is waiting (the waits overlap), two runners when it
  is CPU work (one per core), one runner in lockstep with no cost;
- **dummy**: SB3's ``A2C`` on a ``DummyVecEnv`` (the environments stepped one after the other);
- **subproc**: SB3's ``A2C`` on a ``SubprocVecEnv`` (one process per environment).

It prints, per cost and system, the environment steps and the training wall-clock to solve
(median and range over the seeds; evaluations excluded), the ratio of medians to ``dummy``, and the
swarm's policy lag: the mean number of updates between the policy that chose an action and the
update that learned from it (median over the seeds; SB3's is 0: it collects each rollout with one
policy).
A seed that does not solve within ``--rounds`` rounds counts its whole budget (marked).
``--quick`` runs a small form (costs 0 and 1 ms waiting, seed 0, 8 environments, 2 rounds of
1,000 steps: nothing solves) that a test runs end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from stable_baselines3 import A2C
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from bench.hyperparams import SPECS
from bench.parity import RoundEvaluation, Run
from worker.common import logs
from worker.control.demo import DemoSettings, train_swarm
from worker.control.train import RoundResult
from worker.env.cost import StepCost

SPEC = SPECS["CartPole-v1"]
SYSTEMS = ("swarm", "dummy", "subproc")
MODE = "direct"  # one model answers its runners itself: two hops a step, not the ensemble's three


@dataclass(frozen=True)
class Cost:
    """What each environment step costs: ``ms`` of ``kind`` (``none``: nothing added)."""

    ms: float
    kind: str

    @classmethod
    def parse(cls, text: str) -> Cost:
        ms, _, kind = text.partition(":")
        return cls(float(ms), kind or ("none" if float(ms) == 0 else "wait"))

    def __str__(self) -> str:
        return "no cost" if self.ms == 0 else f"{self.ms:g} ms {self.kind}"


@dataclass(frozen=True)
class Outcome:
    """One seed of one system: steps and training seconds to solve (or the whole budget)."""

    system: str
    seed: int
    solved: bool
    steps: int
    train_seconds: float
    lag: float | None = None  # the swarm's mean policy lag over the run (SB3's: 0)


def outcome(system: str, seed: int, curve: list[RoundResult]) -> Outcome:
    solved = next((p for p in curve if p.eval_return >= SPEC.target), None)  # type: ignore[operator]
    last = solved or curve[-1]
    lags = [lag["mean"] for lag in curve[-1].policy_lag.values() if "mean" in lag]
    lag = lags[0] if lags else None
    return Outcome(system, seed, solved is not None, last.train_steps, last.train_seconds, lag)


def sb3_curve(seed: int, run: Run, cost: Cost, vec_env_cls: type[VecEnv]) -> list[RoundResult]:
    """SB3's A2C on ``run.n_envs`` costly environments in a ``vec_env_cls``, evaluated each round."""
    torch.set_num_threads(1)
    wrapper = {} if cost.ms == 0 else {"wrapper_class": StepCost, "wrapper_kwargs": cost_kwargs(cost)}
    env = make_vec_env(SPEC.env_id, n_envs=run.n_envs, seed=seed, vec_env_cls=vec_env_cls, **wrapper)
    # Evaluation is not timed: SB3's plays without the cost (one environment at a time, it would
    # take 20 episodes x 500 steps x the cost per round), the swarm's in parallel on its runners.
    eval_env = make_vec_env(SPEC.env_id, n_envs=1, seed=seed + 10_000)
    try:
        model = A2C("MlpPolicy", env, seed=seed, device="cpu", **run.spec.sb3_kwargs())
        callback = RoundEvaluation(eval_env, run, SPEC.target)
        model.learn(run.steps, callback=callback)
        return callback.curve
    finally:
        env.close()
        eval_env.close()


def cost_kwargs(cost: Cost) -> dict:
    return {"cost_ms": cost.ms, "kind": cost.kind}


@contextmanager
def runner_environment(cost: Cost) -> Iterator[None]:
    """The runners read their step cost from the environment (``STEP_COST_MS``, ``STEP_COST_KIND``)."""
    saved = {k: os.environ.get(k) for k in ("STEP_COST_MS", "STEP_COST_KIND")}
    os.environ["STEP_COST_MS"] = str(cost.ms)
    if cost.ms:
        os.environ["STEP_COST_KIND"] = cost.kind
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def swarm_layout(cost: Cost, n_envs: int) -> tuple[int, str]:
    """Runner processes and their stepping for ``cost`` (see the module docstring)."""
    if cost.ms == 0:
        return 1, "lockstep"
    return (2, "async") if cost.kind == "cpu" and n_envs % 2 == 0 else (1, "async")


def swarm_curve(seed: int, run: Run, cost: Cost, segments_per_update: int = 1) -> list[RoundResult]:
    runners, stepping = swarm_layout(cost, run.n_envs)
    settings = DemoSettings(
        _cli_parse_args=False,
        **run.spec.worker_settings(run.steps),
        segments_per_update=segments_per_update,
        models=1,
        mode=MODE,
        evolve=False,
        seed=seed,
        n_envs=run.n_envs // runners,
        runners=runners,
        stepping=stepping,
        steps=run.steps_per_round // runners,  # every runner takes a RUN's steps
        rounds=run.rounds,
        eval_episodes=run.eval_episodes,
        target=SPEC.target,
        progress=False,
        plot=None,
    )
    with runner_environment(cost):
        return train_swarm(settings)


def curve_of(system: str, segments_per_update: int) -> Callable[[int, Run, Cost], list[RoundResult]]:
    if system == "swarm":
        return lambda seed, run, cost: swarm_curve(seed, run, cost, segments_per_update)
    vec_env_cls = DummyVecEnv if system == "dummy" else SubprocVecEnv
    return lambda seed, run, cost: sb3_curve(seed, run, cost, vec_env_cls)


def summary(cost: Cost, outcomes: list[Outcome], systems: list[str]) -> list[str]:
    """Rows of the table for one cost: per system, median and range of steps and seconds."""
    rows = []
    medians: dict[str, float] = {}
    for system in systems:
        mine = [o for o in outcomes if o.system == system]
        if not mine:
            continue
        seconds = [o.train_seconds for o in mine]
        steps = [o.steps for o in mine]
        medians[system] = statistics.median(seconds)
        unsolved = sum(not o.solved for o in mine)
        lags = [o.lag for o in mine if o.lag is not None]
        lag = f"{statistics.median(lags):.2f}" if lags else "0"
        rows.append(
            (system, len(mine), unsolved, statistics.median(steps), min(steps), max(steps), medians[system],
             min(seconds), max(seconds), lag)
        )  # fmt: skip
    lines = []
    for system, n, unsolved, steps, low, high, secs, s_low, s_high, lag in rows:
        ratio = secs / medians["dummy"] if medians.get("dummy") else math.nan
        mark = f" ({unsolved} not solved)" if unsolved else ""
        lines.append(
            f"| {cost} | {system} | {n}{mark} | {steps:,.0f} [{low:,}, {high:,}] | {secs:.1f} [{s_low:.1f},"
            f" {s_high:.1f}] | {ratio:.2f}x | {lag} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", nargs="+", default=["0", "1:wait", "1:cpu", "10:wait"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds-slow", type=int, nargs="+", default=[0, 1, 2], help="for costs of 10 ms+")
    parser.add_argument("--n-envs", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps-per-round", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--segments-per-update",
        type=int,
        help="the model's --segments-per-update (default: --n-envs, SB3's update of n_envs segments)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=5e-3,
        help="both sides' (the tutorial's 7e-4 needs ~200k steps with 32 environments)",
    )
    parser.add_argument("--quick", action="store_true", help="the small form a test runs")
    args = parser.parse_args()
    if args.quick:
        args.costs, args.seeds, args.seeds_slow = ["0", "1:wait"], [0], [0]
        args.steps_per_round, args.rounds, args.n_envs = 1_000, 2, 8
    logs.configure("warning", False)
    spec = dataclasses.replace(SPEC, learning_rate=args.learning_rate)
    run = Run(spec, args.n_envs, args.steps_per_round, args.rounds, eval_episodes=20)
    lines = [
        "| step cost | system | seeds | env steps to solve: median [range] | training s to solve: median"
        " [range] | wall-clock vs dummy | policy lag (mean updates) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cost in map(Cost.parse, args.costs):
        seeds = args.seeds_slow if cost.ms >= 10 else args.seeds
        outcomes = []
        for seed in seeds:
            for system in args.systems:
                curve = curve_of(system, args.segments_per_update or args.n_envs)(seed, run, cost)
                result = outcome(system, seed, curve)
                outcomes.append(result)
                print(f"{cost}, {system}, seed {seed}: {result}", flush=True)
        lines += summary(cost, outcomes, args.systems)
        print("\n".join(lines), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

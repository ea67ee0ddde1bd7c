"""Steps and wall-clock to solve CartPole-v1: the swarm through Redis Streams vs in-process SB3 A2C.

Both sides use the same hyper-parameters (the tutorial's: n_steps 5, lr 7e-4 with Adam, net_arch
pi/vf [16, 16], gamma 0.99, gae_lambda 1, ent_coef 0, vf_coef 0.5, max_grad_norm 0.5), the same
number of environments, train in rounds of the same number of environment steps and are evaluated
after each round on 20 deterministic episodes; "solved" is a mean evaluation return of at least 475.
The streams side is one model worker, the aggregator and one environment runner, as separate
processes on a private redis-server (``worker.control.demo.train_swarm``), once per client mode
(``--modes``): the runner acts through the aggregator (``ensemble``), asks the model itself
(``direct``), or acts with a local copy of its policy and streams the steps to it (``local``).
Each mode passes when its median environment steps to solve are at most 1.5x SB3's.

    python -m bench.parity [--seeds 0 1 2] [--steps-per-round 10000] [--modes ensemble direct local]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import gymnasium as gym
import torch
from stable_baselines3 import A2C
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from worker.common import logs
from worker.control.demo import DemoSettings, train_swarm
from worker.control.train import RoundResult

TARGET, EVAL_EPISODES = 475.0, 20


def sb3_a2c(seed: int, n_envs: int) -> A2C:
    """SB3's A2C with the tutorial's hyper-parameters, on ``n_envs`` CartPole-v1 environments."""
    torch.set_num_threads(1)  # as the model worker: small nets run best on one thread
    return A2C(
        "MlpPolicy",
        make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed),
        n_steps=5,
        learning_rate=7e-4,
        gamma=0.99,
        gae_lambda=1.0,
        ent_coef=0.0,
        vf_coef=0.5,
        max_grad_norm=0.5,
        use_rms_prop=False,
        normalize_advantage=False,
        seed=seed,
        device="cpu",
        policy_kwargs={"net_arch": {"pi": [16, 16], "vf": [16, 16]}},
    )


def sb3_curve(seed: int, n_envs: int, steps_per_round: int, max_rounds: int) -> list[RoundResult]:
    model = sb3_a2c(seed, n_envs)
    eval_env = gym.make("CartPole-v1")
    curve: list[RoundResult] = []
    started, train_seconds = time.monotonic(), 0.0
    for r in range(1, max_rounds + 1):
        t0 = time.monotonic()
        model.learn(steps_per_round, reset_num_timesteps=False)
        train_seconds += time.monotonic() - t0
        mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=EVAL_EPISODES, deterministic=True)
        curve.append(
            RoundResult(
                r, model.num_timesteps, float("nan"), float(mean), train_seconds, time.monotonic() - started
            )
        )
        if mean >= TARGET:
            break
    return curve


BOUND = 1.5  # the most median environment steps a mode may need, as a multiple of SB3's


def streams_curve(
    seed: int, n_envs: int, steps_per_round: int, max_rounds: int, mode: str = "ensemble"
) -> list[RoundResult]:
    settings = DemoSettings(
        models=1,
        mode=mode,
        evolve=False,
        seed=seed,
        n_envs=n_envs,
        steps=steps_per_round,
        rounds=max_rounds,
        eval_episodes=EVAL_EPISODES,
        target=TARGET,
        progress=False,
    )
    return train_swarm(settings)


def summary(curve: list[RoundResult]) -> tuple[bool, int, float, float]:
    last = curve[-1]
    return last.eval_return >= TARGET, last.train_steps, last.train_seconds, last.seconds


def plot(curves: list[tuple[str, int, list[RoundResult]]], path: str) -> None:
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
    ax.axhline(TARGET, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("environment steps (training)")
    ax.set_ylabel(f"mean return, {EVAL_EPISODES} deterministic episodes")
    ax.set_title("CartPole-v1, same A2C: in-process SB3 vs through Redis Streams")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=10_000)
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["ensemble", "direct", "local"])
    parser.add_argument("--plot", default="parity.png", help="evaluation curves of every system, every seed")
    args = parser.parse_args()
    logs.configure("warning")

    systems: list[tuple[str, Callable[..., list[RoundResult]]]] = [("SB3 A2C in-process", sb3_curve)]
    systems += [(f"streams, {mode}", functools.partial(streams_curve, mode=mode)) for mode in args.modes]
    rows, curves = [], []
    for seed in args.seeds:
        for name, fn in systems:
            curve = fn(seed, args.n_envs, args.steps_per_round, args.max_rounds)
            curves.append((name, seed, curve))
            solved, steps, train_s, total_s = summary(curve)
            rows.append((name, seed, solved, steps, train_s, total_s))
            print(
                f"{name:<24} seed {seed}: solved={solved} steps={steps} "
                f"train={train_s:.1f}s total={total_s:.1f}s",
                flush=True,
            )

    print(
        f"\nCartPole-v1, {args.n_envs} environments, evaluation every {args.steps_per_round} steps "
        f"({EVAL_EPISODES} deterministic episodes, solved at >= {TARGET:.0f})\n"
    )
    print("| system | seed | solved | env steps to solve | training s | total s (with evaluation) |")
    print("|---|---:|:---:|---:|---:|---:|")
    for name, seed, solved, steps, train_s, total_s in rows:
        print(f"| {name} | {seed} | {'yes' if solved else 'no'} | {steps} | {train_s:.1f} | {total_s:.1f} |")
    for name, _ in systems:
        mine = [r for r in rows if r[0] == name]
        print(
            f"| **{name}, median** | | {sum(r[2] for r in mine)}/{len(mine)} "
            f"| {statistics.median(r[3] for r in mine):.0f} | {statistics.median(r[4] for r in mine):.1f} "
            f"| {statistics.median(r[5] for r in mine):.1f} |"
        )
    plot(curves, args.plot)
    print(f"\ncurves: {args.plot}")
    sb3 = [r for r in rows if r[0].startswith("SB3")]
    print()
    for name, _ in systems[1:]:
        ours = [r for r in rows if r[0] == name]
        step_ratio = statistics.median(r[3] for r in ours) / statistics.median(r[3] for r in sb3)
        time_ratio = statistics.median(r[4] for r in ours) / statistics.median(r[4] for r in sb3)
        verdict = "within" if step_ratio <= BOUND else "OVER"
        print(
            f"{name}: median env steps / SB3's {step_ratio:.2f}x ({verdict} the {BOUND}x bound);"
            f" median training wall-clock {time_ratio:.2f}x"
        )


if __name__ == "__main__":
    main()

"""The README's TensorBoard picture: a demo run with ``--tensorboard-log``, its SB3 scalars plotted
from the event files as TensorBoard draws them (one panel per tag).

    python -m bench.board [--out docs/tensorboard.png] [--rounds 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from worker.common import logs  # noqa: E402
from worker.control.demo import DemoSettings, train_swarm  # noqa: E402

PANELS = [
    ("demo-0", "rollout/ep_rew_mean"),
    ("demo-0", "train/policy_loss"),
    ("demo-0", "train/value_loss"),
    ("demo-0", "train/entropy_loss"),
    ("demo-0", "time/fps"),
    ("control", "eval/mean_reward"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/tensorboard.png")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logs.configure("warning")
    folder = Path(tempfile.mkdtemp(prefix="rl-board-"))
    settings = DemoSettings(
        _cli_parse_args=False,
        models=1,
        evolve=False,
        seed=args.seed,
        steps=5000,
        rounds=args.rounds,
        target=None,
        progress=False,
        plot=None,
        tensorboard_log=str(folder),
    )
    train_swarm(settings)
    runs = {run: EventAccumulator(str(folder / run)) for run in {run for run, _ in PANELS}}
    for events in runs.values():
        events.Reload()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (run, tag) in zip(axes.flat, PANELS, strict=True):
        scalars = runs[run].Scalars(tag)
        ax.plot([s.step for s in scalars], [s.value for s in scalars], color="#e8710a")
        ax.set_title(f"{tag} ({run})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.supxlabel("environment steps (the model's transitions; control: training steps)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"event files: {folder}\npicture: {args.out}")


if __name__ == "__main__":
    main()

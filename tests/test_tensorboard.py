"""``--tensorboard-log``: the models and ``control train`` write SB3's scalar names, with values,
through SB3's own logger, during a real loop (model worker, aggregator, runner on a real redis-server)."""

from __future__ import annotations

import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from worker.control.demo import DemoSettings, train_swarm

MODEL_TAGS = {
    "rollout/ep_rew_mean",
    "rollout/ep_len_mean",
    "train/policy_loss",
    "train/value_loss",
    "train/entropy_loss",
    "train/n_updates",
    "train/learning_rate",
    "time/fps",
}
CONTROL_TAGS = {"rollout/ep_rew_mean", "eval/mean_reward", "time/fps"}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_models_and_control_write_sb3_scalars(redis_server_url: str, tmp_path: Path) -> None:
    settings = DemoSettings(
        _cli_parse_args=False,
        redis_url=redis_server_url,
        prefix="board",
        models=1,
        evolve=False,
        seed=1,
        n_envs=8,
        steps=3000,
        rounds=2,
        eval_episodes=3,
        target=None,
        progress=False,
        plot=None,
        tensorboard_log=str(tmp_path),
    )
    curve = train_swarm(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control", "demo-0"]

    model = scalars(tmp_path / "demo-0")
    assert model.keys() >= MODEL_TAGS, MODEL_TAGS - model.keys()
    updates = model["train/n_updates"]
    assert updates[-1][1] >= 6000 / (8 * 5) * 0.9  # one update per 8 segments of 5 steps, all written
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(updates, updates[1:], strict=False))  # grow
    assert all(math.isfinite(v) for values in model.values() for _, v in values)
    assert 8 <= model["rollout/ep_len_mean"][-1][1] <= 500
    assert model["rollout/ep_rew_mean"] == model["rollout/ep_len_mean"]  # CartPole: reward 1 a step, raw

    control = scalars(tmp_path / "control")
    assert control.keys() >= CONTROL_TAGS, CONTROL_TAGS - control.keys()
    assert [step for step, _ in control["eval/mean_reward"]] == [p.train_steps for p in curve]
    for (_, value), point in zip(control["eval/mean_reward"], curve, strict=True):
        assert math.isclose(value, point.eval_return, rel_tol=1e-6)

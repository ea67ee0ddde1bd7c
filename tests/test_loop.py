"""The whole loop as separate processes on a real redis-server: models, aggregator, environment
runner, evolution and control. Every step is answered and the return improves."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tests.helpers import read
from worker.control.demo import DemoSettings, train_swarm

pytestmark = pytest.mark.slow


def test_swarm_of_two_models_and_four_environments_learns(real_redis, redis_server_url, monkeypatch) -> None:
    monkeypatch.setenv("TRIM_REPLIES", "false")  # the runner keeps the actions it read, to count them
    settings = DemoSettings(
        redis_url=redis_server_url,
        models=2,
        n_envs=4,
        steps=4000,
        rounds=4,
        eval_episodes=8,
        target=10_000,
        seed=3,
        progress=False,
        evolve=True,
    )
    curve = train_swarm(settings)

    assert len(curve) == 4
    assert all(not math.isnan(p.eval_return) for p in curve)
    assert curve[-1].train_steps == 16_000
    first, last = curve[0].train_return, max(p.train_return for p in curve[1:])
    assert last > 1.5 * first, [p.train_return for p in curve]  # random play is ~22 on CartPole

    observations = {i for i, _ in read(real_redis, "rl:observation")}
    actions = Counter(a["OBS_ID"] for _, a in read(real_redis, "rl:action:demo"))
    logits = Counter(r["OBS_ID"] for _, r in read(real_redis, "rl:logits"))
    assert set(actions) == observations and max(actions.values()) == 1  # every step answered once
    assert all(logits[i] == 2 for i in observations)  # by both models
    decided = [(i, a["OBS_ID"], a["MODELS"]) for i, (_, a) in enumerate(read(real_redis, "rl:action:demo"))]
    assert all(models == 2 for *_, models in decided), [d for d in decided if d[2] != 2][:5]
    assert real_redis.xlen("rl:dead") == 0
    generations = [w for _, w in read(real_redis, "rl:weights") if w.get("ACK") == "SET"]
    assert len(generations) == 2 * 3  # both models took a new generation after rounds 1-3

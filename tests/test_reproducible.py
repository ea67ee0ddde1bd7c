"""A seed is one run, whatever the machine's load; and the policy lag is what the stepping implies.

Through the whole loop (model worker, aggregator, runner as processes on a real redis-server):
a seeded lockstep run learns exactly the same curve twice, the second time beside two busy loops;
lockstep learns every transition from the policy that chose its action (SB3's lag, 0), and
asynchronous environments with a step cost do not.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.load import busy, fingerprint
from worker.control.demo import DemoSettings, train_swarm
from worker.model.learner import PolicyLag
from worker.model.memory import Segment, Transition


def settings(redis_url: str, **changes) -> DemoSettings:
    base = DemoSettings(
        _cli_parse_args=False,
        redis_url=redis_url,
        models=1,
        evolve=False,
        seed=3,
        n_envs=8,
        steps=2000,
        rounds=2,
        eval_episodes=3,
        target=None,
        progress=False,
        plot=None,
    )
    return base.model_copy(update=changes)


def test_a_seeded_run_learns_the_same_curve_under_load(redis_server_url) -> None:
    quiet = train_swarm(settings(redis_server_url, prefix="quiet"))
    with busy(2):
        loaded = train_swarm(settings(redis_server_url, prefix="loaded"))
    assert len(quiet) == 2 and fingerprint(quiet) == fingerprint(loaded)
    other = train_swarm(settings(redis_server_url, prefix="other", seed=4))
    assert fingerprint(other) != fingerprint(quiet)  # the seed is what decides


@pytest.mark.parametrize("stepping", ["lockstep", "async"])
def test_policy_lag_follows_the_stepping(redis_server_url, stepping, monkeypatch) -> None:
    if stepping == "async":
        monkeypatch.setenv("STEP_COST_MS", "1")
        monkeypatch.setenv("STEP_COST_KIND", "wait")
    curve = train_swarm(
        settings(redis_server_url, prefix=stepping, stepping=stepping, steps=4000, mode="direct")
    )
    [lag] = curve[-1].policy_lag.values()
    assert lag["transitions"] >= 2000
    if stepping == "lockstep":
        assert lag["mean"] == 0 and lag["zero"] == 1.0
    else:
        assert lag["mean"] > 0 and lag["max"] >= 1


def test_policy_lag_counts_updates_since_each_action() -> None:
    lag = PolicyLag()

    def segment(*answered_at: int) -> Segment:
        rows = [Transition(np.zeros(1), 0, 0.0, False, 0.0, 0.0, a) for a in answered_at]
        return Segment("e", rows, 0.0, False)

    lag.add(5, [segment(5, 5), segment(3, 4, -1)])  # -1: restored from a checkpoint, unknown
    lag.add(6, [segment(6, 0)])
    assert lag.summary() == {"transitions": 6, "mean": 1.5, "zero": 0.5, "p99": 6, "max": 6}

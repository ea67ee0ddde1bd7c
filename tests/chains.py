"""What the streams prove about a runner's environments: each observation answered once, by an action
for its own environment, and each environment moved by the action answered to its last observation
(CartPole's physics replayed from the observation on the stream)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import gymnasium as gym
import numpy as np
import redis

from tests.faults.chaos.checks import implied_counters
from tests.helpers import read, values
from worker.model.store import ModelStore
from worker.protocol import Streams

Entry = tuple[str, dict[str, Any]]


def cartpole_follows(previous: Any, action: int, following: Any) -> bool:
    """Whether CartPole moves from ``previous`` to ``following`` on ``action`` (and not on the other:
    a push left and a push right differ by about 0.36 in the cart's velocity)."""
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    env.state = np.asarray(values(previous), dtype=np.float64)
    moved, *_ = env.step(action)
    return bool(np.allclose(moved, values(following), atol=1e-4))


def answered_once(client: redis.Redis, runner_id: str) -> tuple[list[Entry], dict[str, Any]]:
    """Observations of the runner's environments and the action answering each (by OBS_ID);
    asserts that each has exactly one, naming its environment."""
    prefix = f"{runner_id}-"
    observations = [(i, m) for i, m in read(client, "rl:observation") if m["ENV_ID"].startswith(prefix)]
    ids = {i for i, _ in observations}
    replies = [m for _, m in read(client, Streams("rl").replies(runner_id)) if m["OBS_ID"] in ids]
    counts = Counter(m["OBS_ID"] for m in replies)
    assert set(counts) == ids, f"{len(ids - set(counts))} observations unanswered"
    assert max(counts.values()) == 1, "an observation answered twice"
    env_of = {i: m["ENV_ID"] for i, m in observations}
    assert all(m["ENV_ID"] == env_of[m["OBS_ID"]] for m in replies), "an action for another environment"
    return observations, {m["OBS_ID"]: m["ACTION"] for m in replies}


def delivered(observations: list[Entry], actions: dict[str, Any]) -> Counter[str]:
    """Asserts that each step of a chain took the action answered to the step before it, and that
    the environment moved by it; returns the steps checked per environment."""
    chains: dict[str, list[Entry]] = defaultdict(list)
    for entry in observations:
        chains[entry[1]["ENV_ID"]].append(entry)
    checked: Counter[str] = Counter()
    for env_id, chain in chains.items():
        for (before_id, before), (_, after) in zip(chain, chain[1:], strict=False):
            if "REWARD" not in after:
                continue  # a chain starts afresh: the step before went unanswered or unapplied
            action = actions[before_id]
            assert after["ACTION"] == action, (env_id, before_id)
            if after.get("DONE") and not after.get("TRUNCATED"):
                continue  # a terminal step's last observation is not sent
            following = after["TERMINAL_OBSERVATION"] if after.get("DONE") else after["OBSERVATION"]
            assert cartpole_follows(before["OBSERVATION"], action, following), (env_id, before_id)
            checked[env_id] += 1
    return checked


def learned_once(client: redis.Redis, models: list[str], n_steps: int) -> None:
    """Asserts that each model's committed counters are what the observation stream implies: nothing
    learned twice, nothing missed."""
    streams = Streams("rl")
    for model in models:
        found, wanted = implied_counters(client, streams, model, n_steps)
        assert found == wanted, model
        counters = ModelStore(client, streams, model).load().counters
        assert counters.repeats == 0 and counters.dead == 0, model

"""The returns and advantages the worker trains on are stable-baselines3's, episode ends and
truncations included, for a hand-made sequence sent through the wire protocol."""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer

from tests.helpers import drain, xadd
from worker.model.loop import ModelWorker
from worker.model.policy import make_policy
from worker.model.settings import ModelSettings

GAMMA, LAMBDA = 0.99, 0.95


def obs(env: int, t: int) -> list[float]:
    return [0.1 * env, 0.05 * t, -0.02 * t, 0.01 * (env + t)]


TERMINAL = [0.3, -0.2, 0.1, 0.4]

# Each environment: six messages -> five transitions -> one segment (n_steps = 5).
# Message t carries the REWARD/ACTION of step t-1 and DONE if step t-1 ended the episode.
SEQUENCES = {
    "A": [
        {},
        {"REWARD": 1.0, "ACTION": 0},
        {"REWARD": 1.0, "ACTION": 1, "DONE": True},  # step 1 ends an episode
        {"REWARD": 0.5, "ACTION": 0},
        {"REWARD": 1.0, "ACTION": 1, "TRUNCATED": True, "TERMINAL_OBSERVATION": TERMINAL},  # time limit
        {"REWARD": 2.0, "ACTION": 0},  # segment ends mid-episode: bootstrap from V(obs 5)
    ],
    "B": [
        {},
        {"REWARD": 0.0, "ACTION": 1},
        {"REWARD": 1.0, "ACTION": 1},
        {"REWARD": -1.0, "ACTION": 0},
        {"REWARD": 1.0, "ACTION": 0},
        {"REWARD": 3.0, "ACTION": 1, "DONE": True},  # the segment's last step ends the episode
    ],
}


def reference_gae(rewards, values, starts, last_value, last_done):
    """TD(lambda) advantages written out independently of SB3."""
    n = len(rewards)
    advantages = np.zeros(n)
    running = 0.0
    for t in reversed(range(n)):
        next_nonterminal = 1.0 - (last_done if t == n - 1 else starts[t + 1])
        next_value = last_value if t == n - 1 else values[t + 1]
        delta = rewards[t] + GAMMA * next_value * next_nonterminal - values[t]
        running = delta + GAMMA * LAMBDA * next_nonterminal * running
        advantages[t] = running
    return advantages, advantages + values


def test_returns_and_advantages_match_stable_baselines3(real_redis, settings: ModelSettings) -> None:
    settings = settings.model_copy(update={"gamma": GAMMA, "gae_lambda": LAMBDA, "n_steps": 5})
    worker = ModelWorker(settings, real_redis)
    worker.start()
    reference = make_policy(settings)
    reference.load_state_dict(worker.policy.state_dict())  # the weights every value below came from

    for t in range(6):  # interleaved: A0 B0 A1 B1 ...
        for k, env in enumerate(SEQUENCES):
            xadd(real_redis, "rl:observation", {"OBSERVATION": obs(k, t), "ENV_ID": env, **SEQUENCES[env][t]})
    drain(worker)
    assert worker.counters.updates == 1 and worker.counters.segments == 2

    def value(o) -> float:
        with torch.no_grad():
            return float(reference.predict_values(torch.tensor([o], dtype=torch.float32))[0, 0])

    # What stable-baselines3's A2C.collect_rollouts would have stored for these steps.
    expected = RolloutBuffer(
        5,
        reference.observation_space,
        reference.action_space,
        device="cpu",
        gamma=GAMMA,
        gae_lambda=LAMBDA,
        n_envs=2,
    )
    columns = {}
    for k, env in enumerate(SEQUENCES):
        seq = SEQUENCES[env]
        rewards = [seq[t + 1]["REWARD"] for t in range(5)]
        if "TRUNCATED" in seq[4]:  # step 3 was truncated: SB3 adds gamma * V(terminal observation)
            rewards[3] += GAMMA * value(TERMINAL)
        starts = [1.0] + [
            float(seq[t].get("DONE", False) or seq[t].get("TRUNCATED", False)) for t in range(1, 5)
        ]
        values = [value(obs(k, t)) for t in range(5)]
        columns[env] = dict(
            obs=[obs(k, t) for t in range(5)],
            actions=[seq[t + 1]["ACTION"] for t in range(5)],
            rewards=rewards,
            starts=starts,
            values=values,
            last_value=value(obs(k, 5)),
            last_done=float(seq[5].get("DONE", False)),
        )
    assert columns["A"]["starts"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    for t in range(5):
        col = [columns["A"], columns["B"]]
        expected.add(
            np.array([c["obs"][t] for c in col], dtype=np.float32),
            np.array([[c["actions"][t]] for c in col]),
            np.array([c["rewards"][t] for c in col], dtype=np.float32),
            np.array([c["starts"][t] for c in col], dtype=np.float32),
            torch.tensor([c["values"][t] for c in col]),
            torch.zeros(2),
        )
    expected.compute_returns_and_advantage(
        last_values=torch.tensor([columns["A"]["last_value"], columns["B"]["last_value"]]),
        dones=np.array([columns["A"]["last_done"], columns["B"]["last_done"]], dtype=np.float32),
    )

    got = worker.last_buffer  # flattened env-major by get(): row = column * n_steps + t
    np.testing.assert_allclose(got.rewards, expected.rewards, rtol=1e-5)
    np.testing.assert_array_equal(got.episode_starts, expected.episode_starts)
    np.testing.assert_allclose(got.values.reshape(2, 5).T, expected.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.advantages.reshape(2, 5).T, expected.advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.returns.reshape(2, 5).T, expected.returns, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.actions.reshape(2, 5).T, expected.actions[..., 0])

    for i, env in enumerate(SEQUENCES):  # and SB3 agrees with the equations written out by hand
        c = columns[env]
        advantages, returns = reference_gae(
            np.array(c["rewards"]), np.array(c["values"]), c["starts"], c["last_value"], c["last_done"]
        )
        np.testing.assert_allclose(got.advantages.reshape(2, 5)[i], advantages, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.returns.reshape(2, 5)[i], returns, rtol=1e-4, atol=1e-5)

    # The step that ended episode A (step 1) does not bootstrap: its return is its reward plus nothing
    # beyond the episode; the tutorial's handler would have mixed in the next step's DONE instead.
    a = columns["A"]
    np.testing.assert_allclose(got.returns.reshape(2, 5)[0, 1], a["rewards"][1] + 0.0, rtol=1e-5)

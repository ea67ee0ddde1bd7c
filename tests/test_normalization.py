"""Normalization is VecNormalize's: the same data, step by step, gives the same observations and
rewards as stable-baselines3's own wrapper, and the statistics survive their packing."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from worker.model.inputs import Inputs

N_ENVS, GAMMA = 16, 0.95


def test_observations_and_rewards_are_normalized_as_vecnormalize_does() -> None:
    space = gym.make("Acrobot-v1").observation_space
    reference = VecNormalize(DummyVecEnv([lambda: gym.make("Acrobot-v1")] * N_ENVS), gamma=GAMMA)
    inputs = Inputs(space, normalize_obs=True, normalize_reward=True, gamma=GAMMA)
    rng, returns = np.random.default_rng(0), np.zeros(N_ENVS)
    for _ in range(200):  # one step of every environment: VecNormalize.step_wait's order
        obs = (rng.normal(size=(N_ENVS, 6)) * 3 + 1).astype(np.float32)
        rewards = (rng.normal(size=N_ENVS) - 1).astype(np.float32)
        dones = rng.random(N_ENVS) < 0.05
        reference.obs_rms.update(obs)
        expected_obs = reference.normalize_obs(obs)
        reference._update_reward(rewards)
        expected_rewards = reference.normalize_reward(rewards)
        reference.returns[dones] = 0

        got_obs = inputs.policy_batch(list(obs), [True] * N_ENVS)
        returns = np.array([inputs.discount(float(r), ret) for r, ret in zip(rewards, returns, strict=True)])
        got_rewards = inputs.scale([float(r) for r in rewards])
        returns[dones] = 0
        np.testing.assert_allclose(got_obs, expected_obs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_rewards, expected_rewards, rtol=1e-5, atol=1e-6)


def test_statistics_round_trip_and_evaluation_steps_leave_them_alone() -> None:
    space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    inputs = Inputs(space, normalize_obs=True, normalize_reward=True, gamma=GAMMA)
    batch = [np.array([1.0, 2.0, 3.0], np.float32), np.array([3.0, 2.0, 1.0], np.float32)]
    inputs.policy_batch(batch, [True, True])
    inputs.scale([inputs.discount(1.0, 0.0) and 1.0])
    blob = inputs.pack()
    before = inputs.policy_batch(batch, [False, False])  # evaluation: normalized, not taken in
    assert inputs.pack() == blob
    copy = Inputs(space, normalize_obs=True, normalize_reward=True, gamma=GAMMA)
    copy.restore(blob)
    np.testing.assert_array_equal(copy.policy_batch(batch, [False, False]), before)
    assert copy.pack() == blob

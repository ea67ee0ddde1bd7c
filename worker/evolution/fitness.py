"""Fitness ``returns``: the mean deterministic return of each weight vector, played locally."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from worker.evolution.operators import Vectors
from worker.evolution.settings import EvolutionSettings


class EvolutionError(RuntimeError):
    """A generation that could not take place (no live model, no answer, weights that do not fit)."""


def mean_returns(vectors: Vectors, settings: EvolutionSettings, seeds: list[int]) -> dict[str, float]:
    """Mean return of ``len(seeds)`` deterministic episodes per vector, the envs stepped as one batch."""
    from worker.model.policy import load_weight_vector, make_policy, n_params  # torch: imported when needed

    if not settings.gym_env or settings.gym_env.lower() == "none":
        raise EvolutionError("fitness=returns needs --gym-env to play episodes")
    policy = make_policy(settings)
    envs = [gym.make(settings.gym_env) for _ in seeds]
    fitness = {}
    try:
        for cid, vector in vectors.items():
            if len(vector) != n_params(policy):
                raise EvolutionError(
                    f"{cid} has {len(vector)} weights, the policy of these A2C flags {n_params(policy)}"
                )
            load_weight_vector(policy, vector)
            obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)])
            returns, running = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
            for _ in range(settings.fitness_max_steps):
                actions, _ = policy.predict(obs[running], deterministic=True)
                for i, action in zip(np.flatnonzero(running), actions, strict=True):
                    obs[i], reward, terminated, truncated, _ = envs[i].step(action.item())
                    returns[i] += float(reward)
                    running[i] = not (terminated or truncated)
                if not running.any():
                    break
            fitness[cid] = float(returns.mean())
    finally:
        for env in envs:
            env.close()
    return fitness

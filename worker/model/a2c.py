"""One A2C update over the segments a batch completed, as stable-baselines3's ``A2C.train`` does.

The segments become the columns of a ``RolloutBuffer`` with ``n_envs = len(segments)``; SB3's own
``compute_returns_and_advantage`` turns them into TD(lambda) returns R_t and advantages A_t:

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - done_{t+1}) * A_{t+1}
    R_t     = A_t + V(s_t)

and one gradient step minimises

    L = -mean(A_t * log pi(a_t | s_t)) + vf_coef * mean((R_t - V(s_t))^2) - ent_coef * mean(H[pi(. | s_t)])
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import update_learning_rate

from worker.model.inputs import stack
from worker.model.memory import Segment
from worker.model.settings import A2CSettings


@dataclass(frozen=True)
class UpdateStats:
    segments: int
    applied: bool  # False: the gradient was not finite, so the weights were left as they were
    policy_loss: float
    value_loss: float
    entropy: float


def fill_buffer(policy: ActorCriticPolicy, segments: list[Segment], settings: A2CSettings) -> RolloutBuffer:
    """A ``RolloutBuffer`` holding ``segments`` side by side, returns and advantages computed."""
    n_steps = settings.n_steps
    dict_obs = isinstance(policy.observation_space, gym.spaces.Dict)
    buffer = (DictRolloutBuffer if dict_obs else RolloutBuffer)(
        n_steps,
        policy.observation_space,
        policy.action_space,
        device="cpu",
        gae_lambda=settings.gae_lambda,
        gamma=settings.gamma,
        n_envs=len(segments),
    )
    for t in range(n_steps):
        step = [segment.transitions[t] for segment in segments]
        buffer.add(
            stack([tr.obs for tr in step]),
            np.stack([np.reshape(tr.action, -1) for tr in step]),
            np.array([tr.reward for tr in step], dtype=np.float32),
            np.array([tr.episode_start for tr in step], dtype=np.float32),
            torch.tensor([tr.value for tr in step]),
            torch.tensor([tr.log_prob for tr in step]),
        )
    buffer.compute_returns_and_advantage(
        last_values=torch.tensor([s.last_value for s in segments]),
        dones=np.array([s.last_done for s in segments], dtype=np.float32),
    )
    return buffer


def update(
    policy: ActorCriticPolicy, buffer: RolloutBuffer, settings: A2CSettings, learning_rate: float
) -> UpdateStats:
    """One gradient step on the whole buffer (A2C.train with batch_size=None), at ``learning_rate``."""
    policy.set_training_mode(True)
    update_learning_rate(policy.optimizer, learning_rate)
    # The whole buffer in its own order: get() draws a permutation from numpy's global generator,
    # which a resumed worker does not share, and the loss's sums would round differently.
    next(buffer.get(batch_size=None))  # flattens the buffer's columns
    data = buffer._get_samples(np.arange(buffer.buffer_size * buffer.n_envs))
    actions = data.actions
    if isinstance(policy.action_space, gym.spaces.Discrete):
        actions = actions.long().flatten()  # as A2C.train: Categorical takes indices
    values, log_prob, entropy = policy.evaluate_actions(data.observations, actions)
    values = values.flatten()

    advantages = data.advantages
    if settings.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    policy_loss = -(advantages * log_prob).mean()
    value_loss = F.mse_loss(data.returns, values)
    entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
    loss = policy_loss + settings.ent_coef * entropy_loss + settings.vf_coef * value_loss

    policy.optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
    # Rewards near float32's limit overflow the returns, and one step on a NaN gradient would make
    # every weight NaN for good: no step is better than that (SB3 would take it).
    applied = bool(torch.isfinite(grad_norm))
    if applied:
        policy.optimizer.step()
    policy.set_training_mode(False)
    return UpdateStats(buffer.n_envs, applied, policy_loss.item(), value_loss.item(), -entropy_loss.item())

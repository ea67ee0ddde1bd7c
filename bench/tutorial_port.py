"""Baseline for the throughput benchmark: the tutorial's ``02_model.py`` ported to Redis Streams.

This is a *faithful* port of the tutorial's one-message-at-a-time ``forward`` handler (the swergio
socket client replaced by Redis Streams), kept as the speed baseline of :mod:`bench.throughput`. It
is not a product and must not be fixed: its flaws are what it measures.

Per observation it does what the tutorial does, one Redis command at a time (no pipelining):

1. ``XREADGROUP COUNT 1`` on ``<prefix>:observation`` (its own consumer group);
2. decode the entry with :func:`worker.protocol.decode_entry` (JSON fields or msgpack ``data``);
3. train when the ``RolloutBuffer(5)`` is full (the tutorial's ``train``), ``add`` the transition,
   then ``policy(obs)`` **and** a second forward through ``extract_features``, ``mlp_extractor``,
   ``value_net`` and ``action_net`` on a batch of one;
4. ``XADD`` the logits reply (same encoding as the request) to ``<prefix>:logits``;
5. ``XACK`` the entry.

Flaws kept on purpose: one global ``memory`` dict shared by every ``ENV_ID`` (interleaved
environments corrupt each other's transitions), two forward passes per observation, a gradient step
every 5 observations, three round trips per observation, no persistence.

The only changes from the tutorial are the ones the newer libraries force: ``gymnasium`` spaces
instead of ``gym`` (whose ``Box`` needs the bounds as float32 arrays: the tutorial's float64
``-3.4028235e38`` is just below the float32 range), ``DONE`` wrapped in ``np.array`` for
``compute_returns_and_advantage`` (which calls ``dones.astype``), and a plain Python bool instead of
swergio's ``MutableBool``. The tutorial's code is otherwise kept as written, hence the noqa below.
"""

# ruff: noqa: SIM108, SIM118

from __future__ import annotations

import uuid
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import redis
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import get_schedule_fn

from worker.protocol import Streams, decode_entry, encode_entry

OBS_SPACE = gym.spaces.Box(
    np.array([-4.8000002e00, -3.4028235e38, -4.1887903e-01, -3.4028235e38], dtype=np.float32),
    np.array([4.8000002e00, 3.4028235e38, 4.1887903e-01, 3.4028235e38], dtype=np.float32),
    (4,),
    np.float32,
)
ACT_SPACE = gym.spaces.Discrete(2)
MAX_ENTRY_BYTES = 4 << 20  # the worker's default ``max_entry_bytes``


def train(policy: ActorCriticPolicy, rolloutbuffer: RolloutBuffer) -> None:
    """The tutorial's ``train``, verbatim."""
    ent_coef = 0.0
    vf_coef = 0.5
    max_grad_norm = 0.5
    policy.set_training_mode(True)
    for rollout_data in rolloutbuffer.get(batch_size=None):
        actions = rollout_data.actions
        actions = actions.long().flatten()
        values, log_prob, entropy = policy.evaluate_actions(rollout_data.observations, actions)
        values = values.flatten()
        advantages = rollout_data.advantages
        # Policy gradient loss
        policy_loss = -(advantages * log_prob).mean()
        # Value loss using the TD(gae_lambda) target
        value_loss = torch.nn.functional.mse_loss(rollout_data.returns, values)
        # Entropy loss favor exploration
        if entropy is None:
            # Approximate entropy when no analytical form
            entropy_loss = -torch.mean(-log_prob)
        else:
            entropy_loss = -torch.mean(entropy)

        loss = policy_loss + ent_coef * entropy_loss + vf_coef * value_loss
        # Optimization step
        policy.optimizer.zero_grad()
        loss.backward()
        # Clip grad norm
        torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        policy.optimizer.step()
    policy.set_training_mode(False)
    rolloutbuffer.reset()


class TutorialModel:
    """The tutorial's module-level objects (policy, buffer, memory, flag) as one instance per run."""

    def __init__(self) -> None:
        self.component_id = uuid.uuid4().hex
        with warnings.catch_warnings():  # SB3 2.x deprecates get_schedule_fn and the list net_arch
            warnings.simplefilter("ignore", UserWarning)
            self.policy = ActorCriticPolicy(
                observation_space=OBS_SPACE,
                action_space=ACT_SPACE,
                lr_schedule=get_schedule_fn(7e-4),
                net_arch=[dict(pi=[16, 16], vf=[16, 16])],
            )
        self.rolloutbuffer = RolloutBuffer(
            5, observation_space=OBS_SPACE, action_space=ACT_SPACE, device="cpu"
        )
        self.memory: dict[str, Any] = {}
        self.training_enabled = True
        self.trainings = 0  # not in the tutorial: shows that the baseline trained too

    def forward(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The tutorial's ``forward`` handler."""
        policy, rolloutbuffer, memory = self.policy, self.rolloutbuffer, self.memory
        # Train policy
        if rolloutbuffer.full:
            if self.training_enabled:
                rolloutbuffer.compute_returns_and_advantage(
                    last_values=memory["values"],
                    dones=np.array(msg["DONE"] if "DONE" in msg.keys() else False),
                )
                train(policy, rolloutbuffer)
                self.trainings += 1
            else:
                rolloutbuffer.reset()
        # Save to buffer
        if "REWARD" in msg.keys():
            rewards = msg["REWARD"]
            rolloutbuffer.add(
                memory["obs"],
                np.array(msg["ACTION"]),
                rewards,
                memory["last_episode_starts"],
                memory["values"],
                memory["log_probs"],
            )
        obs = torch.FloatTensor(msg["OBSERVATION"])
        with torch.no_grad():
            # Convert to pytorch tensor or to TensorDict
            obs_tensor = torch.as_tensor(obs)
            actions, values, log_probs = policy(obs_tensor.unsqueeze(0), deterministic=msg["DETERMINISTIC"])
            # Preprocess the observation if needed
            features = policy.extract_features(obs_tensor.unsqueeze(0))
            latent_pi, latent_vf = policy.mlp_extractor(features)
            # Evaluate the values for the given observations
            values = policy.value_net(latent_vf)
            logits = policy.action_net(latent_pi)
        memory["obs"] = obs
        memory["actions"] = actions[0]
        memory["last_episode_starts"] = msg["DONE"] if "DONE" in msg.keys() else True
        memory["values"] = values[0]
        memory["log_probs"] = log_probs[0]
        return {
            "LOGITS": logits[0].tolist(),
            "COMPONENT_ID": self.component_id,
            "DETERMINISTIC": msg["DETERMINISTIC"],
        }


def group_name(model: TutorialModel) -> str:
    return f"tutorial:{model.component_id}"


def create_group(client: redis.Redis, streams: Streams, model: TutorialModel) -> None:
    """The port's consumer group on the observation stream, at its end (``$``), as the worker's."""
    client.xgroup_create(streams.observation, group_name(model), id="$", mkstream=True)


def serve(
    client: redis.Redis, streams: Streams, model: TutorialModel, limit: int, block_ms: int = 1000
) -> int:
    """Answer observations one at a time until ``limit`` are answered (or none arrive for ``block_ms``).

    :return: the number of observations answered
    """
    group, consumer = group_name(model), "tutorial-port"
    answered = 0
    while answered < limit:
        reply = client.xreadgroup(group, consumer, {streams.observation: ">"}, count=1, block=block_ms)
        if not reply:
            break
        [(_, [(entry_id, fields)])] = reply
        msg, encoding = decode_entry(fields, MAX_ENTRY_BYTES)
        response = model.forward(msg)
        client.xadd(streams.logits, encode_entry(response, encoding))
        client.xack(streams.observation, group, entry_id)
        answered += 1
    return answered

"""The policy: stable-baselines3's ``ActorCriticPolicy`` built from settings, its flat weight vector,
and a pickle-free codec for its (and its optimizer's) state.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import torch
from stable_baselines3.common.policies import ActorCriticPolicy

from worker.common.settings import SpacesError
from worker.model.settings import A2CSettings
from worker.protocol import Spaces

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


def make_spaces(settings: A2CSettings) -> tuple[gym.spaces.Box, gym.spaces.Discrete]:
    """Observation and action space, from a gymnasium env id or given explicitly."""
    if settings.gym_env and settings.gym_env.lower() != "none":
        env = gym.make(settings.gym_env)
        obs_space, act_space = env.observation_space, env.action_space
        env.close()
    else:
        if not settings.obs_shape or not settings.n_actions:
            raise SpacesError("without --gym-env, give --obs-shape and --n-actions")
        obs_space = gym.spaces.Box(-np.inf, np.inf, tuple(settings.obs_shape), np.float32)
        act_space = gym.spaces.Discrete(settings.n_actions)
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Discrete):
        raise SpacesError(
            f"need a Box observation and a Discrete action space, got {obs_space} and {act_space}"
        )
    return obs_space, act_space


def make_policy(settings: A2CSettings) -> ActorCriticPolicy:
    """A fresh policy with the optimizer stable-baselines3's A2C would give it."""
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    obs_space, act_space = make_spaces(settings)
    optimizer: dict[str, Any] = {}
    if settings.use_rms_prop:  # as A2C.__init__ does
        optimizer = {
            "optimizer_class": torch.optim.RMSprop,
            "optimizer_kwargs": {"alpha": 0.99, "eps": settings.rms_prop_eps, "weight_decay": 0},
        }
    policy = ActorCriticPolicy(
        observation_space=obs_space,
        action_space=act_space,
        lr_schedule=lambda _progress: settings.learning_rate,  # constant, as the tutorial
        net_arch=dict(settings.net_arch),
        activation_fn=ACTIVATIONS[settings.activation_fn],
        ortho_init=settings.ortho_init,
        **optimizer,
    )
    policy.set_training_mode(False)
    return policy


def policy_spec(settings: A2CSettings, obs_shape: tuple[int, ...], n_actions: int) -> dict[str, Any]:
    """What a client needs to build this model's policy (:func:`policy_from_spec`), as JSON-ready data.

    :param settings: the model's settings (its network)
    :param obs_shape: the observation shape of its spaces
    :param n_actions: the number of actions of its spaces
    """
    return {
        "spaces": json.loads(Spaces(tuple(obs_shape), n_actions).to_json()),
        "net_arch": dict(settings.net_arch),
        "activation_fn": settings.activation_fn,
        "ortho_init": settings.ortho_init,
    }


def policy_from_spec(spec: dict[str, Any]) -> ActorCriticPolicy:
    """A policy of the layout :func:`policy_spec` describes (fresh weights: load a vector into it).

    :param spec: the ``spec`` a model publishes, parsed from JSON
    """
    spaces = Spaces.from_json(json.dumps(spec["spaces"]))
    settings = A2CSettings.model_construct(  # no validation, no environment: exactly this network
        gym_env="none",
        obs_shape=list(spaces.obs_shape),
        n_actions=spaces.n_actions,
        net_arch=spec["net_arch"],
        activation_fn=spec["activation_fn"],
        ortho_init=spec["ortho_init"],
    )
    return make_policy(settings)


def weights_as_vector(policy: torch.nn.Module) -> np.ndarray:
    """Every tensor of ``state_dict()``, flattened and concatenated in its order (the tutorial's layout)."""
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in policy.state_dict().values()])


def load_weight_vector(policy: torch.nn.Module, vector: np.ndarray) -> None:
    """Inverse of :func:`weights_as_vector`; ``vector`` must have exactly :func:`n_params` entries."""
    state = policy.state_dict()
    start = 0
    for name, tensor in state.items():
        stop = start + tensor.numel()
        state[name] = torch.as_tensor(vector[start:stop], dtype=tensor.dtype).reshape(tensor.shape)
        start = stop
    if start != len(vector):
        raise ValueError(f"weight vector has {len(vector)} values, the policy {start}")
    policy.load_state_dict(state)


def n_params(policy: torch.nn.Module) -> int:
    return sum(t.numel() for t in policy.state_dict().values())


# --------------------------------------------------------------------------- state codec (no pickle)

_TENSOR = 1  # msgpack ext code of a tensor: dtype, shape, raw little-endian bytes


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        array = obj.detach().cpu().contiguous().numpy()
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_TENSOR, header + array.tobytes())
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _TENSOR:
        return msgpack.ExtType(code, data)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    array = np.frombuffer(data[unpacker.tell() :], dtype=np.dtype(dtype)).reshape(shape)
    return torch.from_numpy(array.copy())


def pack_state(state: Any) -> bytes:
    """msgpack of a nested ``state_dict`` (tensors, numbers, lists, maps with int or str keys)."""
    return msgpack.packb(state, default=_default, use_bin_type=True)


def unpack_state(blob: bytes) -> Any:
    return msgpack.unpackb(blob, ext_hook=_ext_hook, raw=False, strict_map_key=False)

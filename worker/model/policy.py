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
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.utils import obs_as_tensor

from worker.common.settings import SpacesError
from worker.model.inputs import policy_space
from worker.model.settings import A2CSettings
from worker.protocol import Family, Spaces

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
POLICIES: dict[str, type[ActorCriticPolicy]] = {
    "MlpPolicy": ActorCriticPolicy,
    "CnnPolicy": ActorCriticCnnPolicy,
    "MultiInputPolicy": MultiInputActorCriticPolicy,
}


def make_spaces(settings: A2CSettings) -> Spaces:
    """Observation and action space: a gymnasium env's, a JSON description, or a Box and a Discrete.

    :raises SpacesError: none given, or spaces SB3's A2C cannot take
    """
    try:
        if settings.spaces:
            return Spaces.from_json(settings.spaces)
        if settings.gym_env and settings.gym_env.lower() != "none":
            env = gym.make(settings.gym_env)
            obs_space, act_space = env.observation_space, env.action_space
            env.close()
            return Spaces(obs_space, act_space)
        if not settings.obs_shape or not settings.n_actions:
            raise SpacesError("without --gym-env, give --spaces, or --obs-shape and --n-actions")
        return Spaces.vector(tuple(settings.obs_shape), settings.n_actions)
    except ValueError as exc:
        raise SpacesError(str(exc)) from None


def policy_class(settings: A2CSettings, space: gym.Space) -> type[ActorCriticPolicy]:
    """The policy ``--policy`` names; ``auto`` picks what the observation space needs, as a user of
    SB3 would: ``MultiInputPolicy`` for a Dict, ``CnnPolicy`` for an image, else ``MlpPolicy``."""
    name = settings.policy
    if name == "auto":
        image = is_image_space(space) or (
            isinstance(space, gym.spaces.Dict) and any(is_image_space(s) for s in space.spaces.values())
        )
        name = (
            "MultiInputPolicy"
            if isinstance(space, gym.spaces.Dict)
            else "CnnPolicy"
            if image
            else "MlpPolicy"
        )
    if (name == "MultiInputPolicy") != isinstance(space, gym.spaces.Dict):
        raise SpacesError(
            f"--policy {name} does not fit the observation space {space}"
            " (MultiInputPolicy is for Dict spaces, and Dict spaces need it)"
        )
    if name == "CnnPolicy" and not is_image_space(space):
        raise SpacesError(
            f"--policy CnnPolicy needs an image observation space (uint8, 3 dimensions), not {space}"
        )
    return POLICIES[name]


def make_policy(settings: A2CSettings, spaces: Spaces | None = None) -> ActorCriticPolicy:
    """A fresh policy with the optimizer stable-baselines3's A2C would give it.

    :param spaces: the spaces (default: :func:`make_spaces`)
    """
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    spaces = spaces or make_spaces(settings)
    obs_space = policy_space(spaces.observation)
    optimizer: dict[str, Any] = {}
    if settings.use_rms_prop:  # as A2C.__init__ does
        optimizer = {
            "optimizer_class": torch.optim.RMSprop,
            "optimizer_kwargs": {"alpha": 0.99, "eps": settings.rms_prop_eps, "weight_decay": 0},
        }
    policy = policy_class(settings, obs_space)(
        observation_space=obs_space,
        action_space=spaces.action,
        lr_schedule=lambda _progress: settings.learning_rate,  # constant, as the tutorial
        net_arch=dict(settings.net_arch),
        activation_fn=ACTIVATIONS[settings.activation_fn],
        ortho_init=settings.ortho_init,
        use_sde=settings.use_sde,
        log_std_init=settings.log_std_init,
        **optimizer,
    )
    policy.set_training_mode(False)
    return policy


def evaluate(policy: ActorCriticPolicy, family: Family, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """The distributions (one :class:`~worker.protocol.Family` vector per row) and values of a
    batch of the policy's inputs, in one forward pass, as ``ActorCriticPolicy.forward`` computes them.

    Logits are the action network's output (a MultiBinary's as the pair ``[0, l]`` per value:
    softmax of it is the Bernoulli's); a Box's mean and log-standard-deviation are those of the
    Gaussian SB3 samples from (with gSDE, the standard deviation its noise gives this state).
    """
    with torch.no_grad():
        features = policy.extract_features(obs_as_tensor(batch, policy.device))
        if policy.share_features_extractor:
            latent_pi, latent_vf = policy.mlp_extractor(features)
        else:
            latent_pi = policy.mlp_extractor.forward_actor(features[0])
            latent_vf = policy.mlp_extractor.forward_critic(features[1])
        values = policy.value_net(latent_vf).flatten().numpy()
        if family.kind == "gaussian":
            normal = policy._get_action_dist_from_latent(latent_pi).distribution
            params = torch.cat([normal.mean, normal.scale.log()], dim=1)
        else:
            params = policy.action_net(latent_pi)
            if isinstance(policy.action_space, gym.spaces.MultiBinary):
                params = torch.stack([torch.zeros_like(params), params], dim=2).flatten(1)
        return params.numpy(), values


SPEC_KEYS = ("net_arch", "activation_fn", "ortho_init", "policy", "use_sde", "log_std_init", "normalize_obs")


def policy_spec(settings: A2CSettings, spaces: Spaces) -> dict[str, Any]:
    """What a client needs to build this model's policy (:func:`policy_from_spec`), as JSON-ready data.

    :param settings: the model's settings (its network)
    :param spaces: its spaces
    """
    return {"spaces": json.loads(spaces.to_json()), **{key: getattr(settings, key) for key in SPEC_KEYS}}


def policy_from_spec(spec: dict[str, Any]) -> ActorCriticPolicy:
    """A policy of the layout :func:`policy_spec` describes (fresh weights: load a vector into it).

    :param spec: the ``spec`` a model publishes, parsed from JSON
    """
    spaces = Spaces.from_json_data(spec["spaces"])
    # No validation, no environment: exactly this network (a key missing takes its default).
    settings = A2CSettings.model_construct(**{k: spec[k] for k in SPEC_KEYS if k in spec})
    return make_policy(settings, spaces)


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

"""One worker update is one step of stable-baselines3's ``A2C.train()``, for every action space.

For each case, SB3's A2C and the worker's policy start from the same weights and learn from the same
transitions: SB3's from its own ``rollout_buffer`` (filled as ``collect_rollouts`` would, returns and
advantages by SB3), the worker's from ``fill_buffer`` + ``update`` over ``Segment``s. Afterwards the
weights, the gradients (RMSprop's first step barely depends on their scale, so the gradients are
compared too) and the optimizer's state must be the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv

from worker.model.a2c import fill_buffer, update
from worker.model.memory import Segment, Transition
from worker.model.policy import make_policy, make_spaces
from worker.model.settings import ModelSettings
from worker.protocol.spaces import Spaces

N_ENVS = 3  # segments in the update: SB3's n_envs
RTOL, ATOL = 1e-5, 1e-6
COMMON: dict[str, Any] = dict(
    learning_rate=3e-3,
    n_steps=5,
    gamma=0.9,
    gae_lambda=0.95,
    ent_coef=0.01,
    vf_coef=0.4,
    max_grad_norm=0.5,
    use_rms_prop=True,
    rms_prop_eps=1e-5,
    net_arch={"pi": [16, 16], "vf": [16, 16]},
)
VECTOR = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)


class SpacesEnv(gym.Env):
    """An environment that only has spaces: SB3's A2C needs one to know them (it is never stepped)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


@dataclass(frozen=True)
class Case:
    sb3_policy: str
    observation: gym.Space  # as the environment gives it (images channel-last)
    action: gym.Space
    options: dict[str, Any] = field(default_factory=dict)  # settings beyond COMMON


CASES = {
    "discrete": Case("MlpPolicy", VECTOR, gym.spaces.Discrete(3)),
    "box": Case(
        "MlpPolicy",
        VECTOR,
        gym.spaces.Box(-1, 1, (2,), np.float32),
        {"normalize_advantage": True, "activation_fn": "relu"},
    ),
    "box_sde": Case(
        "MlpPolicy",
        gym.spaces.Box(-5, 5, (3,), np.float32),
        gym.spaces.Box(-2, 2, (2,), np.float32),
        {"use_sde": True, "log_std_init": -0.7},
    ),
    "multidiscrete": Case(
        "MlpPolicy", VECTOR, gym.spaces.MultiDiscrete([3, 2, 4]), {"normalize_advantage": True}
    ),
    "multibinary": Case("MlpPolicy", VECTOR, gym.spaces.MultiBinary(4), {"ent_coef": 0.05}),
    "dict": Case(
        "MultiInputPolicy",
        gym.spaces.Dict(
            {
                "position": gym.spaces.Box(-1, 1, (3,), np.float32),
                "mode": gym.spaces.Discrete(3),
                "flags": gym.spaces.MultiBinary(2),
            }
        ),
        gym.spaces.Discrete(2),
        {"normalize_advantage": True},
    ),
    "image": Case("CnnPolicy", gym.spaces.Box(0, 255, (36, 36, 1), np.uint8), gym.spaces.Discrete(4)),
}


def settings_for(case: Case) -> ModelSettings:
    spaces = Spaces(case.observation, case.action).to_json()
    return ModelSettings(_cli_parse_args=False, spaces=spaces, **{**COMMON, **case.options})


def sb3_model(case: Case, s: ModelSettings) -> A2C:
    """SB3's A2C with the same hyper-parameters (it wraps a channel-last image env in VecTransposeImage)."""
    env = DummyVecEnv([lambda: SpacesEnv(case.observation, case.action)] * N_ENVS)
    activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[s.activation_fn]
    model = A2C(
        case.sb3_policy,
        env,
        learning_rate=s.learning_rate,
        n_steps=s.n_steps,
        gamma=s.gamma,
        gae_lambda=s.gae_lambda,
        ent_coef=s.ent_coef,
        vf_coef=s.vf_coef,
        max_grad_norm=s.max_grad_norm,
        rms_prop_eps=s.rms_prop_eps,
        use_rms_prop=s.use_rms_prop,
        use_sde=s.use_sde,
        normalize_advantage=s.normalize_advantage,
        policy_kwargs=dict(
            net_arch=s.net_arch,
            activation_fn=activation,
            ortho_init=s.ortho_init,
            log_std_init=s.log_std_init,
        ),
        device="cpu",
        seed=0,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # train() logs; learn() would have set one
    assert model._current_progress_remaining == 1.0  # so train() steps at learning_rate
    return model


def sample(space: gym.Space, shape: tuple[int, ...]) -> Any:
    """Values of ``space`` in an array of ``shape`` (a dict of them for a Dict space)."""
    if isinstance(space, gym.spaces.Dict):
        return {k: sample(sub, shape) for k, sub in space.spaces.items()}
    return np.stack([space.sample() for _ in range(int(np.prod(shape)))]).reshape(*shape, *space.shape)


def at(values: Any, index: tuple[int, ...]) -> Any:
    return {k: v[index] for k, v in values.items()} if isinstance(values, dict) else values[index]


@dataclass
class Rollout:
    """``n_steps`` x ``N_ENVS`` transitions, as SB3's collect_rollouts would have gathered them."""

    obs: Any  # as the policy takes it (channel-first images)
    actions: np.ndarray
    rewards: np.ndarray
    starts: np.ndarray
    values: np.ndarray
    log_probs: np.ndarray
    last_values: np.ndarray
    last_dones: np.ndarray


def synthetic(obs_space: gym.Space, action_space: gym.Space, n_steps: int, seed: int) -> Rollout:
    rng = np.random.default_rng(seed)
    obs_space.seed(seed)
    action_space.seed(seed)
    shape = (n_steps, N_ENVS)
    actions = sample(action_space, shape)
    if isinstance(action_space, gym.spaces.Box):  # as sampled from the Gaussian, before clipping
        actions = (1.5 * rng.standard_normal(actions.shape)).astype(np.float32)
    return Rollout(
        obs=sample(obs_space, shape),
        actions=actions,
        rewards=rng.normal(0.5, 1.0, shape).astype(np.float32),
        starts=rng.random(shape) < 0.25,
        values=rng.normal(0.0, 1.0, shape).astype(np.float32),
        log_probs=rng.normal(-1.0, 0.5, shape).astype(np.float32),
        last_values=rng.normal(0.0, 1.0, N_ENVS).astype(np.float32),
        last_dones=np.array([False, True, False]),
    )


def segments(r: Rollout, action_space: gym.Space) -> list[Segment]:
    """The rollout as the worker's memory holds it: one segment per environment."""

    def action(a: np.ndarray) -> int | np.ndarray:
        return int(a) if isinstance(action_space, gym.spaces.Discrete) else a

    n_steps = len(r.rewards)
    return [
        Segment(
            f"env{e}",
            [
                Transition(
                    at(r.obs, (t, e)),
                    action(r.actions[t, e]),
                    float(r.rewards[t, e]),
                    bool(r.starts[t, e]),
                    float(r.values[t, e]),
                    float(r.log_probs[t, e]),
                )
                for t in range(n_steps)
            ],
            last_value=float(r.last_values[e]),
            last_done=bool(r.last_dones[e]),
        )
        for e in range(N_ENVS)
    ]


def fill_sb3(buffer: RolloutBuffer, r: Rollout, action_space: gym.Space) -> None:
    """What collect_rollouts adds, step by step, and its closing compute_returns_and_advantage."""
    for t in range(len(r.rewards)):
        actions = r.actions[t]
        if isinstance(action_space, gym.spaces.Discrete):
            actions = actions.reshape(-1, 1)  # as collect_rollouts does
        buffer.add(
            at(r.obs, (t,)),
            actions,
            r.rewards[t],
            r.starts[t].astype(np.float32),
            torch.as_tensor(r.values[t]).reshape(-1, 1),  # predict_values' shape
            torch.as_tensor(r.log_probs[t]),
        )
    buffer.compute_returns_and_advantage(
        last_values=torch.as_tensor(r.last_values).reshape(-1, 1), dones=r.last_dones.astype(np.float32)
    )


def snapshot(policy: ActorCriticPolicy) -> dict[str, torch.Tensor]:
    """Weights, the gradients of the last step, and the optimizer's state."""
    found = {f"weight {k}": v.detach().clone() for k, v in policy.state_dict().items()}
    found |= {f"grad {k}": p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    for i, state in policy.optimizer.state_dict()["state"].items():
        found |= {f"optimizer {i} {k}": torch.as_tensor(v).clone() for k, v in state.items()}
    return found


def differences(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    assert ours.keys() == theirs.keys()
    return [
        f"{name}: max |diff| {(ours[name] - theirs[name]).abs().max().item():.3g}"
        for name in ours
        if not torch.allclose(ours[name], theirs[name], rtol=RTOL, atol=ATOL)
    ]


def run(case: Case, **worker_changes: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both updates from the same weights and transitions: (worker's snapshot, SB3's snapshot).

    :param worker_changes: settings the worker's fill_buffer and update get differently from SB3
    """
    s = settings_for(case)
    model = sb3_model(case, s)
    ours = make_policy(s, make_spaces(s))
    assert type(ours) is type(model.policy)
    assert ours.observation_space == model.observation_space  # images channel-first on both sides
    ours.load_state_dict(model.policy.state_dict())
    initial = {k: v.clone() for k, v in ours.state_dict().items()}

    rollout = synthetic(model.observation_space, model.action_space, s.n_steps, seed=1)
    fill_sb3(model.rollout_buffer, rollout, model.action_space)
    ws = s.model_copy(update=worker_changes)
    buffer = fill_buffer(ours, segments(rollout, case.action), ws)
    if not worker_changes:
        for name in ("observations", "actions", "returns", "advantages", "episode_starts"):
            got, expected = getattr(buffer, name), getattr(model.rollout_buffer, name)
            for key in got if isinstance(got, dict) else [None]:
                a, b = (got[key], expected[key]) if key else (got, expected)
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{name} {key or ''}")

    model.train()
    stats = update(ours, buffer, ws, learning_rate=s.learning_rate)
    assert stats.applied
    assert any(not torch.equal(v, initial[k]) for k, v in ours.state_dict().items()), "no step was taken"
    return snapshot(ours), snapshot(model.policy)


@pytest.mark.parametrize("name", list(CASES))
def test_update_matches_stable_baselines3(name: str) -> None:
    ours, theirs = run(CASES[name])
    assert differences(ours, theirs) == []


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("discrete", {"ent_coef": 0.1}),  # RMSprop's first step is nearly sign(grad)
        ("dict", {"vf_coef": 0.5}),
        ("box_sde", {"ent_coef": 0.0}),
        ("box", {"normalize_advantage": False}),
        ("multidiscrete", {"gae_lambda": 1.0}),
    ],
)
def test_a_different_setting_is_seen(name: str, changes: dict[str, Any]) -> None:
    """The comparison is not blind: one hyper-parameter set otherwise on the worker's side changes
    the weights it ends with."""
    ours, theirs = run(CASES[name], **changes)
    found = differences(ours, theirs)
    assert any(d.startswith("weight ") for d in found), found
    assert any(d.startswith("grad ") for d in found), found

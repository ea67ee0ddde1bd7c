"""Per-environment settings of the parity bench: the same A2C for SB3 in-process and for the swarm.

Each :class:`EnvSpec` holds the hyper-parameters once, under SB3's names, and gives them in the two
forms the sides take: keyword arguments of SB3's ``A2C`` (plus whether to wrap the ``VecEnv`` in
``VecNormalize``) and the fields of the model worker's
:class:`~worker.model.settings.A2CSettings` (its ``python -m worker model`` flags).

- ``CartPole-v1``: the tutorial's settings, as this bench always used them (SB3's README numbers).
- Any other gymnasium env (:func:`spec_for`): SB3's ``A2C`` defaults, no normalization.
- ``Acrobot-v1`` and ``Pendulum-v1``: RL-zoo's ``hyperparams/a2c.yml`` (DLR-RM/rl-baselines3-zoo),
  whatever an entry leaves out being SB3's ``A2C`` defaults (RMSprop, n_steps 5, lr 7e-4, net_arch
  pi/vf [64, 64], ...). ``normalize: True`` is ``VecNormalize(gamma=gamma)`` on SB3's side and
  ``--normalize-obs --normalize-reward`` on the worker's; ``lin_7e-4`` is a learning rate falling
  linearly to 0 over the run: over *this bench's* budget (``--steps``) on both sides, not RL-zoo's
  ``n_timesteps``, which is too long for this bench (see the budgets below).

Default budgets (environment steps per seed and side) are sized for a 2-core machine: measured
in-process SB3 runs at about 3,100-3,300 steps/s on Pendulum-v1 (RL-zoo's settings, 8 envs, one torch
thread, the machine shared), the swarm at about a seventh of that (see :data:`DEFAULT_STEPS`).
RL-zoo's own budgets (1e6 for Pendulum, 5e5 for Acrobot) would take hours for 5 seeds of both sides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import torch

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}
SB3_NET_ARCH = {"pi": [64, 64], "vf": [64, 64]}  # SB3's default for A2C's MlpPolicy


def linear_schedule(initial: float, progress_remaining: float) -> float:
    """RL-zoo's ``lin_<initial>``: the learning rate at ``progress_remaining`` (1 at the start, 0 at
    the end of ``learn``'s ``total_timesteps``).

    :param initial: the learning rate at the start
    :param progress_remaining: SB3's ``_current_progress_remaining``
    """
    return initial * progress_remaining


@dataclass(frozen=True)
class EnvSpec:
    """One environment's settings for both sides of the bench.

    :param env_id: gymnasium env id
    :param n_envs: parallel training environments (SB3's ``n_envs``; the runner's ``--n-envs``)
    :param steps: default budget: most training environment steps per seed and side
    :param steps_per_round: training environment steps between two evaluations
    :param target: mean evaluation return that counts as solved (training stops there); ``None``:
        none, the bench reports the final mean return
    :param eval_episodes: deterministic evaluation episodes after each round
    :param learning_rate: the (initial) learning rate
    :param schedule: ``constant``, or ``linear`` down to 0 at the end of the budget (RL-zoo's lin_)
    :param normalize: ``VecNormalize`` on observations and rewards (RL-zoo's ``normalize: True``)
    :param a2c: the other A2C hyper-parameters, under SB3's (and A2CSettings') names
    :param net_arch: the policy's and value's hidden layers (SB3's ``net_arch``)
    :param ortho_init: orthogonal initialization of the weights
    :param log_std_init: Box actions: the initial log standard deviation
    :param activation_fn: ``tanh`` or ``relu``
    :param source: where these settings come from
    """

    env_id: str
    n_envs: int
    steps: int
    steps_per_round: int
    target: float | None
    eval_episodes: int
    learning_rate: float = 7e-4
    schedule: Literal["constant", "linear"] = "constant"
    normalize: bool = False
    a2c: dict[str, Any] = field(default_factory=dict)
    net_arch: dict[str, list[int]] = field(default_factory=lambda: dict(SB3_NET_ARCH))
    ortho_init: bool = True
    log_std_init: float = 0.0
    activation_fn: Literal["tanh", "relu"] = "tanh"
    source: str = ""

    @property
    def gamma(self) -> float:
        """The discount (SB3's default 0.99 unless given); also ``VecNormalize``'s."""
        return float(self.a2c.get("gamma", 0.99))

    def sb3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of SB3's ``A2C`` (the policy and the environment aside); a linear
        schedule ends where ``learn``'s ``total_timesteps`` do, so the bench calls ``learn`` once."""
        lr: Any = self.learning_rate
        if self.schedule == "linear":
            lr = functools.partial(linear_schedule, self.learning_rate)
        policy_kwargs = {
            "net_arch": self.net_arch,
            "ortho_init": self.ortho_init,
            "log_std_init": self.log_std_init,
            "activation_fn": ACTIVATIONS[self.activation_fn],
        }
        return {**self.a2c, "learning_rate": lr, "policy_kwargs": policy_kwargs}

    def worker_settings(self, total_timesteps: int) -> dict[str, Any]:
        """The same hyper-parameters as fields of the model worker's ``A2CSettings`` (its flags).

        :param total_timesteps: the run's budget, which a linear schedule ends at
        """
        linear = self.schedule == "linear"
        return {
            **self.a2c,
            "gym_env": self.env_id,
            "policy": "MlpPolicy",
            "learning_rate": self.learning_rate,
            "learning_rate_schedule": self.schedule,
            "total_timesteps": total_timesteps if linear else None,
            "normalize_obs": self.normalize,
            "normalize_reward": self.normalize,
            "net_arch": self.net_arch,
            "ortho_init": self.ortho_init,
            "log_std_init": self.log_std_init,
            "activation_fn": self.activation_fn,
        }


# SB3's A2C defaults that the worker's A2CSettings set otherwise (the tutorial's Adam): every entry
# from RL-zoo, which leaves them to SB3, states them.
SB3_DEFAULTS: dict[str, Any] = {
    "n_steps": 5,
    "gamma": 0.99,
    "gae_lambda": 1.0,
    "ent_coef": 0.0,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "use_rms_prop": True,
    "rms_prop_eps": 1e-5,
    "normalize_advantage": False,
    "use_sde": False,
}

# The default budgets of Acrobot-v1 and Pendulum-v1, sized so that 5 seeds of SB3 plus 5 of the swarm
# in one mode take about 20-25 minutes on this 2-core machine, shared (load average 3-4 while
# measured). Measured there on Pendulum-v1 with its settings, 20,000 steps in one round: SB3
# in-process ~3,100-3,300 env steps/s (Acrobot-v1 ~3,400); the swarm (ensemble) only ~480 steps/s, each of
# its four processes waiting for a core (CartPole-v1 likewise: ~555 steps/s, against ~3,000 in
# README's measurements on an idle machine). One seed of both sides at 80,000 steps: SB3 ~25 s + the
# swarm ~167 s of training, 5 evaluations (Pendulum: 10 episodes of 200 steps; ~1.5 s in-process,
# ~4.5 s through the swarm) and ~25 s for the swarm to start: ~250 s, so ~21 minutes for 5 seeds.
# On an idle machine the same time buys ~3-4x the steps: raise it with --steps.
DEFAULT_STEPS, DEFAULT_STEPS_PER_ROUND = 80_000, 16_000

SPECS: dict[str, EnvSpec] = {
    spec.env_id: spec
    for spec in [
        EnvSpec(
            "CartPole-v1",
            n_envs=8,
            steps=300_000,  # 30 rounds of 10,000, as this bench always ran
            steps_per_round=10_000,
            target=475.0,
            eval_episodes=20,
            a2c={**SB3_DEFAULTS, "use_rms_prop": False},  # the tutorial's Adam
            net_arch={"pi": [16, 16], "vf": [16, 16]},
            source="the tutorial's (Adam, net_arch pi/vf [16, 16])",
        ),
        EnvSpec(
            "Acrobot-v1",
            n_envs=16,
            steps=DEFAULT_STEPS,  # RL-zoo: 5e5; training stops once solved (-100)
            steps_per_round=DEFAULT_STEPS_PER_ROUND,
            target=-100.0,
            eval_episodes=10,
            normalize=True,
            a2c=dict(SB3_DEFAULTS),  # RL-zoo: ent_coef 0.0, the rest SB3's defaults
            source="RL-zoo a2c.yml: normalize, n_envs 16, ent_coef 0",
        ),
        EnvSpec(
            "Pendulum-v1",
            n_envs=8,
            steps=DEFAULT_STEPS,  # RL-zoo: 1e6
            steps_per_round=DEFAULT_STEPS_PER_ROUND,
            target=None,
            eval_episodes=10,
            learning_rate=7e-4,
            schedule="linear",
            normalize=True,
            a2c={
                **SB3_DEFAULTS,
                "n_steps": 8,
                "gamma": 0.9,
                "gae_lambda": 0.9,
                "vf_coef": 0.4,
                "max_grad_norm": 0.5,
                "use_rms_prop": True,
                "normalize_advantage": False,
                "use_sde": True,
            },
            ortho_init=False,
            log_std_init=-2.0,
            source="RL-zoo a2c.yml: normalize, n_envs 8, n_steps 8, gamma 0.9, gae_lambda 0.9, vf_coef 0.4,"
            " RMSprop, gSDE, lin_7e-4, log_std_init -2, ortho_init False",
        ),
    ]
}


def spec_for(env_id: str) -> EnvSpec:
    """The table's settings for ``env_id``; any other registered gymnasium env gets SB3's ``A2C``
    defaults (8 environments, no normalization, the default budget), solved at the env's registered
    ``reward_threshold`` if it has one.

    :param env_id: gymnasium env id
    :raises gymnasium.error.Error: when no such env is registered
    """
    if env_id in SPECS:
        return SPECS[env_id]
    threshold = gym.spec(env_id).reward_threshold
    return EnvSpec(
        env_id,
        n_envs=8,
        steps=DEFAULT_STEPS,
        steps_per_round=DEFAULT_STEPS_PER_ROUND,
        target=None if threshold is None else float(threshold),
        eval_episodes=10,
        a2c=dict(SB3_DEFAULTS),
        source="not in the table: SB3's A2C defaults",
    )

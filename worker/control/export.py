"""A model as a stable-baselines3 ``A2C`` zip: ``python -m worker control export``.

**Export** builds an ``A2C`` the way a user of SB3 would (its policy and hyper-parameters, on a
stand-in environment with the model's spaces), loads the model's committed checkpoint into it
(policy and optimizer) and saves it with ``A2C.save``: ``A2C.load`` in a plain SB3 install reads it,
and its ``predict(obs, deterministic=True)`` is the model's deterministic answer. What the model
publishes decides the network and the spaces (the ``spec`` of ``<prefix>:model:<id>:policy``); the
optimizer's class is the checkpoint's. The training hyper-parameters (``--gamma``, ``--n-steps``, ...)
are not published by a model: they are this command's flags, which default to a model's. A flag of
the network or the spaces that disagrees with the model is refused, never silently ignored.

A model that normalizes its observations (``--normalize-obs``) answers for normalized ones: its
statistics are written beside the zip as SB3's ``VecNormalize.save`` writes them
(``model.vecnormalize.pkl`` beside ``model.zip``), for ``VecNormalize.load``; ``predict`` then takes
``venv.normalize_obs(obs)``, as for any SB3 model trained under ``VecNormalize``.

**Import** (``--init-from``) is :mod:`worker.model.sb3zip`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from worker.common.settings import CommonSettings
from worker.model.sb3zip import ZipError
from worker.model.settings import A2CSettings

if TYPE_CHECKING:  # torch and SB3 only once a command runs: --help stays light
    import gymnasium as gym
    import redis

    from worker.protocol import Spaces, Streams

SPACE_FLAGS = ("gym_env", "spaces", "obs_shape", "n_actions")
class ExportSettings(CommonSettings, A2CSettings):
    """``python -m worker control export``: write a model's last checkpoint as an SB3 ``A2C`` zip.

    The network and the spaces are the model's own; the training hyper-parameters, which a model
    does not publish, are these flags (give the ones the model runs with).
    """

    component_id: str = Field(description="the model to export")
    path: CliPositionalArg[Path] = Field(description="the zip to write (A2C.load reads it)")


def run_export(settings: ExportSettings) -> int:
    """Export, and print the files written; a model that cannot be exported is one line on stderr.

    :param settings: the command's settings
    """
    from worker.cli import mendable
    from worker.protocol import Streams

    with mendable():
        written = export(settings.connect(), Streams(settings.prefix), settings)
    print(f"{settings.component_id}: " + ", ".join(str(path) for path in written))
    return 0


def export(client: redis.Redis, streams: Streams, settings: ExportSettings) -> list[Path]:
    """Write the zip of ``settings.component_id``'s last commit, and its ``VecNormalize`` statistics
    beside it if it normalizes; return the files written.

    :param client: the deployment's Redis (decode_responses off)
    :param streams: the deployment's names
    :param settings: the model, the zip's path and the training hyper-parameters
    :raises ZipError: no checkpoint, no published spec, or flags that contradict the model
    """
    from stable_baselines3 import A2C
    from stable_baselines3.common.utils import LinearSchedule

    from worker.model.inputs import policy_space
    from worker.model.policy import ACTIVATIONS, SPEC_KEYS, policy_class, unpack_state
    from worker.model.store import ModelStore
    from worker.protocol import Spaces

    cid = settings.component_id
    snapshot = ModelStore(client, streams, cid).load()
    if snapshot.policy is None:
        raise ZipError(f"model {cid!r} has no checkpoint in {streams.model_key(cid, 'checkpoint')}")
    spec = client.hget(streams.model_key(cid, "policy"), "spec")
    if spec is None:
        raise ZipError(
            f"model {cid!r} publishes no spec in {streams.model_key(cid, 'policy')} (is it run with"
            " --publish-weights-every 0?)"
        )
    published = json.loads(spec)
    spaces = Spaces.from_json_data(published["spaces"])
    network = A2CSettings.model_construct(**{k: published[k] for k in SPEC_KEYS if k in published})
    optimizer = unpack_state(snapshot.optimizer) if snapshot.optimizer is not None else None
    group = optimizer["param_groups"][0] if optimizer else {}
    rms_prop = "alpha" in group  # RMSprop's; Adam has betas
    _refuse_contradictions(settings, network, spaces, rms_prop)
    s = settings
    rate = (
        s.learning_rate
        if s.learning_rate_schedule == "constant"
        else LinearSchedule(s.learning_rate, 0.0, 1.0)
    )
    model = A2C(
        policy_class(network, policy_space(spaces.observation)),
        _stand_in(spaces),
        learning_rate=rate,
        n_steps=s.n_steps,
        gamma=s.gamma,
        gae_lambda=s.gae_lambda,
        ent_coef=s.ent_coef,
        vf_coef=s.vf_coef,
        max_grad_norm=s.max_grad_norm,
        rms_prop_eps=group.get("eps", s.rms_prop_eps) if rms_prop else s.rms_prop_eps,
        use_rms_prop=rms_prop,
        use_sde=network.use_sde,
        normalize_advantage=s.normalize_advantage,
        policy_kwargs={
            "net_arch": dict(network.net_arch),
            "activation_fn": ACTIVATIONS[network.activation_fn],
            "ortho_init": network.ortho_init,
            "log_std_init": network.log_std_init,
        },
        seed=s.seed,
        device="cpu",
    )
    model.policy.load_state_dict(unpack_state(snapshot.policy))
    if optimizer is not None:
        model.policy.optimizer.load_state_dict(optimizer)
    model.num_timesteps = snapshot.counters.transitions  # where a linear schedule goes on from
    written = [_write(settings.path, model.save)]
    statistics = _statistics(settings, network, spaces, snapshot.normalization)
    if statistics is not None:
        written.append(_write(settings.path.with_suffix(".vecnormalize.pkl"), statistics.save))
    return written


def _refuse_contradictions(
    settings: ExportSettings, network: A2CSettings, spaces: Spaces, rms_prop: bool
) -> None:
    """A flag of the network, the optimizer or the spaces (given on the command line or in the
    environment) must say what the model has: the export takes them from the model."""
    from worker.model.policy import SPEC_KEYS, make_spaces

    given = settings.model_fields_set
    wrong = [key for key in SPEC_KEYS if key in given and getattr(settings, key) != getattr(network, key)]
    if "use_rms_prop" in given and settings.use_rms_prop != rms_prop:
        wrong.append("use_rms_prop")
    flags = [key for key in SPACE_FLAGS if key in given]
    if flags and make_spaces(settings).to_json() != spaces.to_json():
        wrong += flags
    if wrong:
        names = ", ".join("--" + key.replace("_", "-") for key in wrong)
        raise ZipError(
            f"{names}: model {settings.component_id!r} has another value; the export takes the network,"
            " the optimizer and the spaces from the model (leave these flags out)"
        )


def _stand_in(spaces: Spaces) -> gym.Env:
    """An environment with the model's spaces and nothing else, for ``A2C`` (never stepped or saved)."""
    import gymnasium as gym

    class StandIn(gym.Env):
        observation_space, action_space = spaces.observation, spaces.action

    return StandIn()


def _statistics(settings: ExportSettings, network: A2CSettings, spaces: Spaces, blob: bytes | None) -> Any:
    """The model's normalization statistics as a ``VecNormalize`` (on a stand-in environment), or
    ``None`` if it normalizes nothing."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from worker.model.inputs import CLIP, EPSILON, Inputs

    inputs = Inputs(spaces.observation, network.normalize_obs, settings.normalize_reward, settings.gamma)
    inputs.restore(blob)
    if not inputs.obs_rms and inputs.ret_rms is None:
        return None
    keyed = isinstance(spaces.observation, gym.spaces.Dict)
    venv = VecNormalize(
        DummyVecEnv([lambda: _stand_in(spaces)]),
        norm_obs=bool(inputs.obs_rms),
        norm_reward=inputs.ret_rms is not None,
        clip_obs=CLIP,
        clip_reward=CLIP,
        gamma=settings.gamma,
        epsilon=EPSILON,
        norm_obs_keys=list(inputs.obs_rms) if keyed else None,
    )
    if inputs.obs_rms:
        venv.obs_rms = dict(inputs.obs_rms) if keyed else inputs.obs_rms[""]
    if inputs.ret_rms is not None:
        venv.ret_rms = inputs.ret_rms
    return venv


def _write(path: Path, save: Any) -> Path:
    """``save(path)`` through a temporary file beside it (with a suffix SB3 leaves alone): a failure
    leaves no half-written file."""
    partial = path.with_name(path.name + ".partial")
    try:
        save(partial)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise ZipError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path

"""A model as a stable-baselines3 ``A2C`` zip, and back: ``python -m worker control export`` and
``python -m worker model --init-from``.

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

**Import** (``--init-from``) reads an SB3 zip without unpickling anything: ``policy.pth`` with
``torch.load(weights_only=True)``, the spaces and the policy's options from the readable fields of
the zip's ``data`` JSON (its pickled ones are never opened), then every tensor's name and shape
against the model's own policy. A zip that does not fit, or whose ``policy.pth`` needs unpickling,
is refused with one line. A model that already has a checkpoint keeps it: the checkpoint wins
(:meth:`~worker.model.learner.Learner.restore` says so once).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from worker.common.settings import CommonSettings, SpacesError
from worker.model.settings import A2CSettings

if TYPE_CHECKING:  # torch and SB3 only once a command runs: --help stays light
    import gymnasium as gym
    import redis
    import torch
    from stable_baselines3.common.policies import ActorCriticPolicy

    from worker.protocol import Spaces, Streams

SPACE_FLAGS = ("gym_env", "spaces", "obs_shape", "n_actions")
# Options of an SB3 policy a model cannot take unless they have SB3's default value.
POLICY_DEFAULTS = {
    "share_features_extractor": True,
    "normalize_images": True,
    "squash_output": False,
    "full_std": True,
    "use_expln": False,
}
POLICY_OPTIONS = {
    "net_arch",
    "activation_fn",
    "ortho_init",
    "log_std_init",
    "optimizer_class",
    "optimizer_kwargs",
}


class ZipError(SpacesError):
    """A model that cannot be exported, or a zip a model cannot start from: mended with a flag."""


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


# --------------------------------------------------------------------------- import (--init-from)


def read_policy(path: Path, settings: A2CSettings, policy: ActorCriticPolicy) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an SB3 zip's policy, checked against ``policy`` (the model's own, built
    from ``settings``); nothing is unpickled.

    :param path: a zip ``A2C.save`` wrote
    :param settings: the model's settings (its activation, gSDE and ``--policy``)
    :param policy: the model's fresh policy: the zip's tensors must have its names and shapes
    :raises ZipError: not such a zip, a ``policy.pth`` that needs unpickling, or other spaces or network
    """
    import torch

    where = f"--init-from {path}"
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data"))
            blob = archive.read("policy.pth")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ZipError(f"{where}: not a stable-baselines3 zip ({exc})") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; the first line says which
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZipError(f"{where}: its policy.pth cannot be read without unpickling ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ZipError(f"{where}: its policy.pth holds no state_dict of tensors")
    for role, space in (("observation", policy.observation_space), ("action", policy.action_space)):
        found, mine = _space_in_zip(data.get(f"{role}_space")), _space_seen(space)
        if not _same_space(found, mine):
            theirs = found[0] if found[0] != mine[0] else f"{found[0]} with other bounds"
            raise ZipError(f"{where}: its {role} space is {theirs}, this model's {mine[0]}")
    _check_options(where, data, settings)
    mine = policy.state_dict()
    if state.keys() != mine.keys():
        odd = sorted(state.keys() ^ mine.keys())[0]
        raise ZipError(
            f"{where}: its policy is not of this model's kind (--policy {settings.policy}): {odd!r} is in"
            f" {'the zip' if odd in state else 'this model'} only"
        )
    for name, tensor in mine.items():
        if state[name].shape != tensor.shape:
            raise ZipError(
                f"{where}: {name} is {tuple(state[name].shape)} in the zip, {tuple(tensor.shape)} in this"
                f" model; the zip's network is --net-arch '{json.dumps(_net_arch(state))}'"
            )
    return state


def _check_options(where: str, data: dict[str, Any], settings: A2CSettings) -> None:
    """The policy's options the zip's ``data`` shows in readable form that change what the same
    tensors compute: the activation, gSDE, and options a model does not take."""
    options = data.get("policy_kwargs") or {}
    activation = str(options.get("activation_fn", "Tanh")).rstrip("'>").rsplit(".", 1)[-1].lower()
    if activation != settings.activation_fn:
        raise ZipError(f"{where}: its activation is {activation}, this model's {settings.activation_fn}")
    if bool(data.get("use_sde", False)) != settings.use_sde:
        raise ZipError(f"{where}: use_sde is {data.get('use_sde')} in the zip, {settings.use_sde} here")
    for key, value in options.items():
        if key.startswith(":") or key in POLICY_OPTIONS or POLICY_DEFAULTS.get(key, object()) == value:
            continue
        raise ZipError(f"{where}: its policy_kwargs set {key}={value!r}, which a model does not take")


def _space_in_zip(entry: Any) -> tuple[str, dict[str, list[float] | None]]:
    """A space as the readable fields of the zip's ``data`` JSON describe it: its type, shape,
    dtype and sizes, and a Box's bounds (``None`` where printed with ``...``)."""
    if not isinstance(entry, dict):
        return "missing", {}
    kind = str(entry.get(":type:", "")).rstrip("'>").rsplit(".", 1)[-1]
    sizes = {key: _numbers(str(entry[key])) for key in ("n", "nvec", "start") if key in entry}
    bounds = {key: _numbers(str(entry[key])) for key in ("low", "high") if key in entry}
    return _describe(kind, tuple(entry.get("_shape") or ()), str(entry.get("dtype")), sizes), bounds


def _space_seen(space: gym.Space) -> tuple[str, dict[str, list[float] | None]]:
    """:func:`_space_in_zip`'s view of one of the model's own spaces."""
    import numpy as np

    def numbers(key: str) -> dict[str, list[float] | None]:
        return {key: np.ravel(getattr(space, key)).astype(float).tolist()} if hasattr(space, key) else {}

    sizes = {**numbers("n"), **numbers("nvec"), **numbers("start")}
    kind, shape = type(space).__name__, tuple(space.shape or ())
    return _describe(kind, shape, str(space.dtype), sizes), {**numbers("low"), **numbers("high")}


def _same_space(found: tuple[str, dict], mine: tuple[str, dict]) -> bool:
    """The same description, and the same bounds where the zip shows them (as NumPy printed them:
    to 8 digits)."""
    import numpy as np

    if found[0] != mine[0]:
        return False
    pairs = [(found[1].get(key), mine[1].get(key)) for key in ("low", "high")]
    return all(
        zip_bound is None
        or (len(zip_bound) == len(own) and np.allclose(zip_bound, own, rtol=1e-6, atol=1e-7))
        for zip_bound, own in pairs
        if own is not None
    )


def _describe(kind: str, shape: tuple, dtype: str, sizes: dict[str, Any]) -> str:
    """``Discrete(2)``, ``MultiDiscrete(3, 2)``, ``Box((4,), float32)``; a Dict is only ``Dict``
    (its keys and shapes are checked through the tensors' names and shapes)."""
    if kind == "Dict":
        return kind
    if kind in ("Discrete", "MultiDiscrete", "MultiBinary"):
        counts = ", ".join(str(int(n)) for n in sizes.get("n") or sizes.get("nvec") or [])
        starts = any(sizes.get("start") or [])
        return f"{kind}({counts}{', start ' + str(sizes['start']) if starts else ''})"
    return f"{kind}({shape}, {dtype})"


def _numbers(text: str) -> list[float] | None:
    """The numbers of an array as NumPy prints it (``[-4.8 -inf 0.41887903]``); ``None`` when they
    are not all there (a long array printed with ``...``)."""
    try:
        return [float(token) for token in text.replace("[", " ").replace("]", " ").split()]
    except ValueError:
        return None


def _net_arch(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The ``net_arch`` of an ``ActorCriticPolicy``'s ``state_dict``: its layers' widths."""
    arch: dict[str, list[int]] = {"pi": [], "vf": []}
    for key, net in (("pi", "policy_net"), ("vf", "value_net")):
        prefix = f"mlp_extractor.{net}."
        layers = sorted(
            (int(name[len(prefix) :].split(".")[0]), t.shape[0])
            for name, t in state.items()
            if name.startswith(prefix) and name.endswith(".weight")
        )
        arch[key] = [width for _, width in layers]
    return arch

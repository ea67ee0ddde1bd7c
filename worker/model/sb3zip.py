"""Reading a stable-baselines3 ``A2C`` zip for ``python -m worker model --init-from``, without
unpickling anything.

``policy.pth`` is read with ``torch.load(weights_only=True)``, the spaces and the policy's options
from the readable fields of the zip's ``data`` JSON (its pickled ones are never opened), then every
tensor's name and shape is checked against the model's own policy. A zip that does not fit, or whose
``policy.pth`` needs unpickling, is refused with one line. A model that already has a checkpoint
keeps it: the checkpoint wins (:meth:`~worker.model.learner.Learner.restore` says so once). The
other way, a model as such a zip, is ``control export`` (:mod:`worker.control.export`).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.common.settings import SpacesError
from worker.model.settings import A2CSettings

if TYPE_CHECKING:
    import gymnasium as gym
    import torch
    from stable_baselines3.common.policies import ActorCriticPolicy

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

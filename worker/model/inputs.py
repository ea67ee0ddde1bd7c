"""From an observation on the wire to the policy's input, as stable-baselines3's wrappers make it.

- **Images** arrive as the environment gives them (height, width, channels); SB3's policies take
  channels first, and SB3 wraps such an environment in ``VecTransposeImage``: so does this.
- **Normalization** (``--normalize-obs``, ``--normalize-reward``) is ``VecNormalize``'s, with its
  running statistics (SB3's ``RunningMeanStd``) kept per model::

      obs'   = clip((obs - mean_obs) / sqrt(var_obs + eps), -clip_obs, clip_obs)
      R_t    = gamma * R_{t-1} + r_t           (per environment; 0 again after an episode ends)
      r'     = clip(r / sqrt(var_R + eps), -clip_reward, clip_reward)

  A batch's training observations (not evaluation ones, nor repeats) are taken into the statistics
  before they are normalized, and its returns before its rewards are scaled, as
  ``VecNormalize.step_wait`` does with one step of a vector of environments (with the lockstep
  runner, a batch is one); the returns R_t live in each environment's memory. They are committed
  with the model's state, so a crash changes nothing; evolution's GET and SET leave them alone.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecTransposeImage

from worker.protocol.values import Value

EPSILON = 1e-8
CLIP = 10.0  # VecNormalize's clip_obs and clip_reward


def _transposed(space: gym.Space) -> bool:
    return is_image_space(space) and not is_image_space_channels_first(space)


def policy_space(space: gym.Space) -> gym.Space:
    """The observation space the policy is built for: channel-last images turned channel-first."""
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: policy_space(sub) for k, sub in space.spaces.items()})
    return VecTransposeImage.transpose_space(space) if _transposed(space) else space  # type: ignore[arg-type]


def stack(values: list[Value]) -> Any:
    """A batch of observations: one array, or one per key of a Dict space."""
    first = values[0]
    if isinstance(first, dict):
        return {k: np.stack([v[k] for v in values]) for k in first}  # type: ignore[index]
    return np.stack(values)  # type: ignore[arg-type]


def row(batch: Any, i: int) -> Value:
    """Observation ``i`` of a batch (:func:`stack`'s inverse for one)."""
    if isinstance(batch, dict):
        return {k: np.asarray(v[i]) for k, v in batch.items()}
    return np.asarray(batch[i])  # a 0-d array for a Discrete value, never a numpy scalar


class Inputs:
    """Turns wire observations into the policy's, and rewards into what it learns from.

    :param space: the observation space on the wire
    :param normalize_obs: keep running statistics of the observations and normalize them
    :param normalize_reward: keep running statistics of the discounted returns and scale rewards
    :param gamma: the discount of those returns (A2C's)
    """

    def __init__(self, space: gym.Space, normalize_obs: bool, normalize_reward: bool, gamma: float) -> None:
        self.space, self.gamma = space, gamma
        subspaces = space.spaces if isinstance(space, gym.spaces.Dict) else {"": space}
        self.transpose = [k for k, sub in subspaces.items() if _transposed(sub)]
        # VecNormalize takes any Box; images are left alone (their policies scale them already).
        keys = [
            k for k, sub in subspaces.items() if isinstance(sub, gym.spaces.Box) and not is_image_space(sub)
        ]
        self.obs_rms = {k: RunningMeanStd(shape=subspaces[k].shape) for k in keys} if normalize_obs else {}
        self.ret_rms = RunningMeanStd(shape=()) if normalize_reward else None
        self._returns: list[float] = []  # discounted returns not yet taken in by ret_rms
        self.changed = False  # the statistics moved since the last :meth:`pack`

    def _items(self, batch: Any) -> dict[str, np.ndarray]:
        return batch if isinstance(batch, dict) else {"": batch}

    def _rebuild(self, items: dict[str, np.ndarray], like: Any) -> Any:
        return items if isinstance(like, dict) else items[""]

    def policy_batch(self, values: list[Value], learn: list[bool]) -> Any:
        """The policy's input for ``values``; the statistics first take in those with ``learn``."""
        items = dict(self._items(stack(values)))
        if self.obs_rms and any(learn):
            for key, rms in self.obs_rms.items():
                rms.update(items[key][np.asarray(learn)].astype(np.float64))
            self.changed = True
        for key, rms in self.obs_rms.items():
            normalized = np.clip((items[key] - rms.mean) / np.sqrt(rms.var + EPSILON), -CLIP, CLIP)
            items[key] = normalized.astype(np.float32)
        for key in self.transpose:
            items[key] = VecTransposeImage.transpose_image(items[key])
        return self._rebuild(items, values[0])

    def discount(self, reward: float, ret: float) -> float:
        """The environment's discounted return after a training ``reward`` (its return so far
        ``ret``), taken in by the statistics at the next :meth:`scale`."""
        if self.ret_rms is None:
            return ret
        ret = ret * self.gamma + reward
        self._returns.append(ret)
        return ret

    def scale(self, rewards: list[float]) -> list[float]:
        """The rewards of a batch as learned from: the statistics first take in the returns
        :meth:`discount` gave since the last call, all at once (as ``VecNormalize`` takes in one
        step of all its environments), then every reward is scaled by them."""
        if self.ret_rms is None:
            return rewards
        if self._returns:
            self.ret_rms.update(np.array(self._returns))
            self._returns, self.changed = [], True
        scaled = np.clip(np.array(rewards) / np.sqrt(self.ret_rms.var + EPSILON), -CLIP, CLIP)
        return scaled.tolist()

    # ----------------------------------------------------------------- persistence

    def pack(self) -> bytes:
        """The statistics, as committed with the model (msgpack, no pickle)."""
        stats = {key: _rms(rms) for key, rms in self.obs_rms.items()}
        return msgpack.packb(
            {"obs": stats, "ret": _rms(self.ret_rms) if self.ret_rms else None}, use_bin_type=True
        )

    def restore(self, blob: bytes | None) -> None:
        """Become the committed statistics (fresh ones for ``None``: none were committed)."""
        fresh = Inputs(self.space, bool(self.obs_rms), self.ret_rms is not None, self.gamma)
        self.obs_rms, self.ret_rms, self.changed = fresh.obs_rms, fresh.ret_rms, False
        self._returns = []
        if blob is None:
            return
        stored = msgpack.unpackb(blob, raw=False)
        for key, rms in self.obs_rms.items():
            if key in stored["obs"]:
                _load(rms, stored["obs"][key])
        if self.ret_rms is not None and stored["ret"] is not None:
            _load(self.ret_rms, stored["ret"])


def _rms(rms: RunningMeanStd) -> list[Any]:
    return [rms.mean.astype("<f8").tobytes(), rms.var.astype("<f8").tobytes(), float(rms.count)]


def _load(rms: RunningMeanStd, stored: list[Any]) -> None:
    mean, var, count = stored
    rms.mean = np.frombuffer(mean, "<f8").reshape(rms.mean.shape).copy()
    rms.var = np.frombuffer(var, "<f8").reshape(rms.var.shape).copy()
    rms.count = count

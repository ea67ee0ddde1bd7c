"""Random numbers keyed by what they decide: the seed, the environment and its step.

An action drawn for an observation is a function of the seed and that observation alone, never of
how observations were batched, in which order a component decided them, whether a step was sent
again after a lost reply, or whether the component restarted in between. A seeded run is therefore
the same run however loaded the machine is, and a repeated step draws the same action.

A row's key is ``h(seed, env_id)`` mixed with its step; its k-th number is ``splitmix64(key + k * G)``
(Steele, Lea and Flood's finalizer, G the 64-bit golden ratio), vectorized over the batch. An
observation without a STEP (a hand-written entry) has nothing to key on and draws from a generator
seeded with the same seed instead.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
S30, S27, S31, S11 = (np.uint64(s) for s in (30, 27, 31, 11))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function of each 64-bit word (wrapping arithmetic)."""
    z = x + GOLDEN
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


class Draws:
    """The source of every sampled action of one component.

    :param seed: the component's ``--seed``; ``None`` for a random one
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else seed
        word = self.seed & ((1 << 128) - 1)  # any integer a --seed flag takes
        self._salt = word.to_bytes(16, "little")
        self._envs: dict[str, int] = {}
        self._unkeyed = np.random.default_rng(word)

    def _env(self, env_id: str) -> int:
        key = self._envs.get(env_id)
        if key is None:
            digest = hashlib.blake2b(env_id.encode(), digest_size=8, key=self._salt).digest()
            key = self._envs[env_id] = int.from_bytes(digest, "little")
            if len(self._envs) > 100_000:  # environments come and go; hashing again is cheap
                self._envs.clear()
        return key

    def rows(self, env_ids: Sequence[str], steps: Sequence[int | None]) -> Rows:
        """The numbers of a batch: one row per observation (its ENV_ID and STEP)."""
        keys = np.empty(len(env_ids), dtype=np.uint64)
        for i, (env_id, step) in enumerate(zip(env_ids, steps, strict=True)):
            if step is None:
                keys[i] = self._unkeyed.integers(1 << 63, dtype=np.uint64)
            else:
                keys[i] = self._env(env_id) ^ (step & ((1 << 64) - 1))
        return Rows(splitmix64(keys))


class Rows:
    """The numbers of each row of a batch, handed out in order: the first call's ``k`` numbers of a
    row are its numbers 0 .. k-1, the next call's the following ones."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys, self.used = keys, 0

    def __len__(self) -> int:
        return len(self.keys)

    def uniform(self, k: int = 1) -> np.ndarray:
        """``(n, k)`` numbers in [0, 1), 53 random bits each."""
        index = np.arange(self.used, self.used + k, dtype=np.uint64)
        self.used += k
        bits = splitmix64(self.keys[:, None] + index[None, :] * GOLDEN)
        return (bits >> S11).astype(np.float64) * 2.0**-53

    def normal(self, k: int = 1) -> np.ndarray:
        """``(n, k)`` standard normal numbers (Box-Muller)."""
        u = self.uniform(2 * k)
        radius = np.sqrt(-2.0 * np.log1p(-u[:, :k]))  # 1 - u lies in (0, 1]
        return radius * np.cos(2.0 * np.pi * u[:, k:])

    def integers(self, high: int) -> np.ndarray:
        """``(n,)`` integers in [0, high)."""
        return np.minimum((self.uniform(1)[:, 0] * high).astype(np.int64), high - 1)

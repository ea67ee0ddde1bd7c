"""Actions from the distributions models answer with, for every component that chooses one: the
aggregator for the ensemble of M models, a model for an observation of its inbox (M = 1).

A distribution is a :class:`~worker.protocol.Family` and its flat parameters; :func:`decide`
combines M of them per observation by the rules stated, with their math, in :mod:`worker.aggregator`,
and gives each model its share of the decision, share_i = p_i(a) / sum_j p_j(a), computed from
log-likelihoods so that it is exact where the probabilities themselves would underflow.
"""

from __future__ import annotations

import math

import numpy as np

from worker.common.draws import Rows
from worker.protocol import Family

LOG_2PI = math.log(2 * math.pi)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the maximum so large logits do not overflow."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One action per row of ``probs`` (rows sum to 1), by inverting each row's CDF at ``u`` (n,)."""
    cdf = probs.cumsum(axis=-1)
    u = u[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), probs.shape[-1] - 1)


def _split(family: Family, params: np.ndarray) -> list[np.ndarray]:
    """The logits of each dimension (categorical: one), along the last axis."""
    bounds = np.cumsum(family.sizes)[:-1]
    return np.split(params, bounds, axis=-1)


def _gaussian(family: Family, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = family.sizes[0]
    return params[..., :d], params[..., d:]


def log_prob(family: Family, params: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """log p(action) under each distribution.

    :param params: ``(..., n_params)``
    :param actions: ``(...)`` integers (categorical), ``(..., dims)`` integers (multi) or
        ``(..., d)`` numbers (gaussian), broadcast against ``params``' leading axes
    """
    if family.kind == "gaussian":
        mean, log_std = _gaussian(family, params)
        z = (actions - mean) * np.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * LOG_2PI).sum(axis=-1)
    if family.kind == "categorical":
        actions = np.asarray(actions)[..., None]
    total = 0.0
    for k, logits in enumerate(_split(family, params)):
        chosen = np.asarray(actions[..., k : k + 1], dtype=np.int64)
        lp = log_softmax(logits)
        total = total + np.take_along_axis(lp, np.broadcast_to(chosen, (*lp.shape[:-1], 1)), axis=-1)[..., 0]
    return np.asarray(total)


def _choose(probs: np.ndarray, deterministic: np.ndarray, draws: Rows) -> np.ndarray:
    return np.where(deterministic, probs.argmax(axis=-1), sample(probs, draws.uniform(1)[:, 0]))


def decide(
    family: Family, params: np.ndarray, deterministic: np.ndarray, combine: str, draws: Rows
) -> tuple[list, np.ndarray]:
    """The ensemble's action for each of N observations, and each model's share of it.

    :param params: ``(N, M, n_params)``: M models' distributions for N observations
    :param deterministic: ``(N,)``: the observation asks for the most likely action
    :param draws: the random numbers of the N observations (:meth:`worker.common.draws.Draws.rows`)
    :param combine: ``"prob"`` or ``"logits"`` (see the module)
    :return: the N actions (integers; lists of integers for multi; lists of numbers for gaussian)
        and the ``(N, M)`` shares
    """
    if family.kind == "gaussian":
        mean, log_std = _gaussian(family, params)
        std = np.exp(log_std)
        n, m, d = mean.shape
        if combine == "prob":
            center = mean.mean(axis=1)
            pick = draws.integers(m)
            draw = mean[np.arange(n), pick] + std[np.arange(n), pick] * draws.normal(d)
        else:
            precision = std**-2
            center = (precision * mean).sum(axis=1) / precision.sum(axis=1)
            draw = center + precision.mean(axis=1) ** -0.5 * draws.normal(d)
        actions = np.where(deterministic[:, None], center, draw)
        chosen = actions[:, None, :]
        result: list = actions.tolist()
    else:
        dims = []
        for logits in _split(family, params):
            probs = softmax(logits).mean(axis=1) if combine == "prob" else softmax(logits.mean(axis=1))
            dims.append(_choose(probs / probs.sum(axis=-1, keepdims=True), deterministic, draws))
        actions = np.stack(dims, axis=-1)
        chosen = actions[:, None, :] if family.kind == "multi" else actions[:, None, 0]
        result = actions[:, 0].tolist() if family.kind == "categorical" else actions.tolist()
    return result, shares(log_prob(family, params, chosen))


def shares(log_likelihoods: np.ndarray) -> np.ndarray:
    """Each model's normalized likelihood of the chosen action, ``(N, M)`` from ``(N, M)``; where
    every model's is zero (or not finite), equal shares: nobody made a difference."""
    finite = np.isfinite(log_likelihoods)
    safe = np.where(finite, log_likelihoods, -np.inf)
    top = safe.max(axis=-1, keepdims=True)
    ok = np.isfinite(top)
    weights = np.where(ok, np.exp(safe - np.where(ok, top, 0.0)), 1.0)
    return weights / weights.sum(axis=-1, keepdims=True)

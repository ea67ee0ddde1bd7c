"""Variation of a population of weight vectors: PBT's exploit/explore, and the tutorial's DEAP GA.

Pure: vectors and fitness in, new vectors and what was done to each out.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from deap import base, tools

from worker.evolution.settings import EvolutionSettings

Vectors = dict[str, np.ndarray]  # component ID -> flat float32 weight vector


def ranked(fitness: dict[str, float]) -> list[str]:
    """Component IDs, best first (ties by ID, for reproducibility)."""
    return sorted(fitness, key=lambda cid: (-fitness[cid], cid))


def pbt_step(
    vectors: Vectors, fitness: dict[str, float], settings: EvolutionSettings, rng: np.random.Generator
) -> tuple[Vectors, dict[str, str]]:
    """Exploit/explore: the bottom quantile copies (and perturbs) a better top-quantile model."""
    order = ranked(fitness)
    k = min(max(1, int(len(order) * settings.pbt_quantile)), len(order) // 2)
    top, bottom = order[:k], order[len(order) - k :]
    new, actions = dict(vectors), {cid: "kept" for cid in order}
    for loser in bottom:
        donor = top[int(rng.integers(len(top)))]
        if fitness[loser] >= fitness[donor]:  # a tie: nothing to exploit
            continue
        noise = rng.normal(0.0, settings.pbt_sigma, vectors[donor].shape) if settings.pbt_sigma else 0.0
        new[loser] = (vectors[donor] + noise).astype(np.float32)
        actions[loser] = f"copied {donor}" + (f" + N(0, {settings.pbt_sigma})" if settings.pbt_sigma else "")
    return new, actions


class FitnessMax(base.Fitness):
    weights = (1.0,)


class Individual(list):
    """A weight vector as DEAP's operators want it: a list (cxTwoPoint's slice swap breaks on numpy views)."""

    def __init__(self, values: Any, fitness: float, parents: list[str]) -> None:
        super().__init__(values)
        self.fitness = FitnessMax((fitness,))
        self.parents, self.mutated = parents, False

    def story(self) -> str:
        how = "crossover of " if len(self.parents) > 1 else "copy of "
        return how + " x ".join(self.parents) + (", mutated" if self.mutated else "")


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """DEAP draws from the ``random`` module: seed it for the block, then restore its state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def ga_step(
    vectors: Vectors, fitness: dict[str, float], settings: EvolutionSettings, seed: int
) -> tuple[Vectors, dict[str, str]]:
    """The tutorial's generation: elites kept; the rest tournament-selected, crossed, mutated."""
    order = ranked(fitness)
    elites, rest = order[: settings.elitism], order[settings.elitism :]
    new = {cid: vectors[cid] for cid in elites}
    actions = {cid: "elite, kept" for cid in elites}
    population = [Individual(vectors[cid].tolist(), fitness[cid], [cid]) for cid in order]
    with seeded_random(seed):
        chosen = tools.selTournament(population, len(rest), settings.tournament_size)
        offspring = [Individual(ind, ind.fitness.values[0], ind.parents) for ind in chosen]  # clones
        for a, b in zip(offspring[::2], offspring[1::2], strict=False):  # odd one out: no mate
            if random.random() < settings.cxpb:
                tools.cxTwoPoint(a, b)
                a.parents, b.parents = a.parents + b.parents, b.parents + a.parents
        for child in offspring:
            if random.random() < settings.mutpb:
                tools.mutGaussian(child, mu=0.0, sigma=settings.mutation_sigma, indpb=settings.indpb)
                child.mutated = True
    for cid, child in zip(rest, offspring, strict=True):
        new[cid], actions[cid] = np.asarray(child, dtype=np.float32), child.story()
    return new, actions

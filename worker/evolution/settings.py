"""Options of ``python -m worker evolution`` (and of ``control train``, which runs generations)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from worker.common.settings import CommonSettings
from worker.model.settings import A2CSettings


class EvolutionSettings(CommonSettings, A2CSettings):
    """``python -m worker evolution``: one generation over the live models (A2C flags: their policy)."""

    algorithm: Literal["pbt", "ga"] = Field("pbt", description="pbt: copy best into worst; ga: DEAP GA")
    fitness: Literal["returns", "contribution"] = Field(
        "returns", description="mean deterministic return of each model, or its share in the ensemble"
    )
    timeout: float = Field(10.0, gt=0, description="seconds to wait for the weights, and for the SET acks")
    registry_max_age: float = Field(5.0, gt=0, description="models with an older heartbeat are not live")
    fitness_episodes: int = Field(5, gt=0, description="deterministic episodes per model (fitness=returns)")
    fitness_max_steps: int = Field(10_000, gt=0, description="cut evaluation episodes at this many steps")
    tournament_size: int = Field(3, gt=0, description="ga: individuals per tournament")
    cxpb: float = Field(0.5, ge=0, le=1, description="ga: probability of a two-point crossover per pair")
    mutpb: float = Field(0.2, ge=0, le=1, description="ga: probability of mutating an offspring")
    mutation_sigma: float = Field(0.1, ge=0, description="ga: standard deviation of a Gaussian mutation")
    indpb: float = Field(0.1, ge=0, le=1, description="ga: probability of mutating each weight")
    elitism: int = Field(1, ge=0, description="ga: the best models kept unchanged")
    pbt_quantile: float = Field(0.25, gt=0, le=0.5, description="pbt: share of models replaced/donating")
    pbt_sigma: float = Field(0.01, ge=0, description="pbt: standard deviation of the copied weights' noise")
    seed: int | None = Field(None, description="seed of operators and evaluation (mixed with the generation)")
    stream_maxlen: int = Field(1000, gt=0, description="approximate MAXLEN of <prefix>:evolution")
    evolution_timeout: float = Field(
        60.0, gt=0, description="the models' --evolution-timeout: a generation interrupted within it resumes"
    )

"""``python -m worker evolution``: one generation of evolution over the live model workers.

One generation, through the wire protocol of ``docs/protocol.md``:

1. **Collect.** ``XADD <prefix>:evolution {CMD: GET}`` (msgpack); every model replies on
   ``<prefix>:weights`` with ``{WEIGHTS, COMPONENT_ID, REQUEST_ID}`` and pauses training. We read
   replies carrying our ``REQUEST_ID`` until every live model (registry heartbeat) answered or
   ``--timeout`` passed, then go on with the models that did answer.
2. **Fitness.** ``returns``: each weight vector is loaded into a local copy of the policy and plays
   ``--eval-episodes`` deterministic episodes of ``--gym-env`` (the same seeds for every model);
   fitness = mean return. ``contribution``: the aggregator's share of each model in the ensemble's
   actions, taken (renamed away) from ``<prefix>:contribution`` in the GET's own script
   (:data:`REQUEST`, ``evolution.lua``), so each generation sees the decisions since the previous GET
   (models without an entry get 0).
3. **Vary.** ``pbt`` (exploit/explore): every model of the bottom ``--pbt-quantile`` whose fitness is
   below a randomly picked top-quantile model gets that model's weights plus N(0, --pbt-sigma) noise;
   the rest keep theirs. ``ga`` (the tutorial's DEAP loop): the best ``--elitism`` models are kept
   unchanged; the others get offspring of ``tools.selTournament``, ``tools.cxTwoPoint`` (probability
   ``--cxpb``) and ``tools.mutGaussian`` (probability ``--mutpb``, per-weight ``--indpb``).
4. **Set.** ONE ``{CMD: SET, WEIGHTS: {id: float32 bytes}}`` naming every model that answered the GET,
   unchanged ones with their own vector, so every paused model resumes at once (loading its own
   vector changes nothing but the pause: a model keeps its optimizer state on every SET). We wait
   for each ``{ACK: SET}`` with ``--timeout``. Models that never answered are not named: they resume
   after their own ``--evolution-timeout``.

Randomness comes from ``--seed`` mixed with the generation number (``INCR <prefix>:generation``), so
a seeded run is reproducible and successive generations differ. Run one evolution per prefix.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import redis
from deap import base, tools
from pydantic import Field

from worker.common import logs, lua
from worker.common.connections import last_id
from worker.common.registry import live_models
from worker.common.settings import CommonSettings
from worker.model.settings import A2CSettings
from worker.protocol import Encoding, ProtocolError, Streams, decode_entry, encode_entry

log = logs.get("worker.evolution")

REQUEST = lua.source(__package__, "evolution.lua")  # the GET and the shares, at once and once

MAX_REPLY_BYTES = 1 << 28  # replies come from our own models; only absurd sizes are refused
Vectors = dict[str, np.ndarray]  # component ID -> flat float32 weight vector


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


class EvolutionError(RuntimeError):
    """A generation that could not take place (no live model, no answer)."""


@dataclass
class EvolutionReport:
    """What one generation did."""

    generation: int
    algorithm: str
    fitness: dict[str, float]  # per model that answered the GET
    actions: dict[str, str]  # per model: what was done to its weights
    missing: list[str]  # live models whose weights did not come within the timeout
    acknowledged: list[str]
    unacknowledged: list[str]  # sent a SET, no ACK within the timeout
    seconds: float


# --------------------------------------------------------------------------- operators (pure)


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


# --------------------------------------------------------------------------- fitness "returns"


def mean_returns(vectors: Vectors, settings: EvolutionSettings, seeds: list[int]) -> dict[str, float]:
    """Mean return of ``len(seeds)`` deterministic episodes per vector, the envs stepped as one batch."""
    from worker.model.policy import load_weight_vector, make_policy, n_params  # torch: imported when needed

    if not settings.gym_env or settings.gym_env.lower() == "none":
        raise EvolutionError("fitness=returns needs --gym-env to play episodes")
    policy = make_policy(settings)
    envs = [gym.make(settings.gym_env) for _ in seeds]
    fitness = {}
    try:
        for cid, vector in vectors.items():
            if len(vector) != n_params(policy):
                raise EvolutionError(
                    f"{cid} has {len(vector)} weights, the policy of these A2C flags {n_params(policy)}"
                )
            load_weight_vector(policy, vector)
            obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds, strict=True)])
            returns, running = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
            for _ in range(settings.fitness_max_steps):
                actions, _ = policy.predict(obs[running], deterministic=True)
                for i, action in zip(np.flatnonzero(running), actions, strict=True):
                    obs[i], reward, terminated, truncated, _ = envs[i].step(action.item())
                    returns[i] += float(reward)
                    running[i] = not (terminated or truncated)
                if not running.any():
                    break
            fitness[cid] = float(returns.mean())
    finally:
        for env in envs:
            env.close()
    return fitness


# --------------------------------------------------------------------------- the wire


def request_weights(
    client: redis.Redis, streams: Streams, settings: EvolutionSettings
) -> tuple[str, dict[str, float]]:
    """XADD the GET and, with fitness=contribution, take (and reset) the shares, at once."""
    request_key = streams.key(f"contribution:{uuid.uuid4().hex}")
    get = encode_entry({"CMD": "GET"}, Encoding.MSGPACK)["data"]
    take = "1" if settings.fitness == "contribution" else "0"
    keys = [streams.evolution, streams.contribution, request_key]
    flat = client.register_script(REQUEST)(keys=keys, args=[settings.stream_maxlen, get, take])
    taken = {flat[k].decode(): flat[k + 1] for k in range(0, len(flat), 2)}
    client.delete(request_key)
    get_id = taken.pop(".get_id").decode()
    return get_id, {k: float(v) for k, v in taken.items()}


def await_replies(
    client: redis.Redis, stream: str, cursor: str, request_id: str, expected: set[str], timeout: float
) -> dict[str, dict[str, Any]]:
    """Messages on ``stream`` after ``cursor`` answering ``request_id``, by COMPONENT_ID, until all
    ``expected`` answered or ``timeout`` seconds passed (unexpected answers are kept too)."""
    replies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not expected <= replies.keys() and (remaining := deadline - time.monotonic()) > 0:
        block = max(1, int(min(remaining, 0.5) * 1000))  # never 0: that blocks forever
        for _, items in client.xread({stream: cursor}, block=block, count=1000) or []:
            for entry_id, fields in items:
                cursor = entry_id
                try:
                    message, _ = decode_entry(fields, MAX_REPLY_BYTES)
                except ProtocolError:
                    continue
                if message.get("REQUEST_ID") == request_id and isinstance(message.get("COMPONENT_ID"), str):
                    replies[message["COMPONENT_ID"]] = message
    return replies


def send_weights(
    client: redis.Redis, streams: Streams, vectors: Vectors, settings: EvolutionSettings
) -> set[str]:
    """One SET naming every model; the IDs that acknowledged it within the timeout."""
    cursor = last_id(client, streams.weights)
    weights = {cid: np.asarray(v, dtype="<f4").tobytes() for cid, v in vectors.items()}
    message = encode_entry({"CMD": "SET", "WEIGHTS": weights}, Encoding.MSGPACK)
    set_id = client.xadd(streams.evolution, message, maxlen=settings.stream_maxlen, approximate=True).decode()
    acks = await_replies(client, streams.weights, cursor, set_id, set(vectors), settings.timeout)
    return {cid for cid, reply in acks.items() if reply.get("ACK") == "SET"}


def _vector(component_id: str, weights: Any) -> np.ndarray | None:
    """A reply's flat weight vector, or ``None`` (logged) when it is not one: that model is resumed."""
    try:
        vector = np.asarray(weights, np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        log.warning("weights are not a vector of numbers", component_id=component_id, error=str(exc))
        return None
    if vector.ndim != 1 or not vector.size:
        log.warning("weights are not a flat vector", component_id=component_id, shape=list(vector.shape))
        return None
    return vector


def evolve(client: redis.Redis, settings: EvolutionSettings) -> EvolutionReport:
    """Run one generation over the live models; see the module docstring."""
    started, streams = time.monotonic(), Streams(settings.prefix)
    live = live_models(client, streams, settings.registry_max_age)
    if not live:
        raise EvolutionError(
            f"no live models (heartbeat in {streams.registry} within {settings.registry_max_age}s)"
        )
    generation = int(client.incr(streams.key("generation")))
    rng = np.random.default_rng(None if settings.seed is None else [settings.seed, generation])

    cursor = last_id(client, streams.weights)
    get_id, shares = request_weights(client, streams, settings)
    replies = await_replies(client, streams.weights, cursor, get_id, set(live), settings.timeout)
    missing = sorted(set(live) - replies.keys())
    if missing:
        log.warning("no weights within the timeout", missing=missing, timeout=settings.timeout)
    own = {c: v for c, r in replies.items() if (v := _vector(c, r.get("WEIGHTS"))) is not None}
    if not own:
        raise EvolutionError(f"none of the live models {live} sent its weights within {settings.timeout}s")

    # Individuals must have one layout; a model of another architecture is resumed, not evolved.
    size = Counter(len(v) for v in own.values()).most_common(1)[0][0]
    vectors = {cid: v for cid, v in own.items() if len(v) == size and np.isfinite(v).all()}
    try:
        if settings.fitness == "contribution":
            fitness = {cid: shares.get(cid, 0.0) for cid in vectors}
        else:
            seeds = rng.integers(2**31, size=settings.fitness_episodes).tolist()  # the same for every model
            fitness = mean_returns(vectors, settings, seeds)
        if settings.algorithm == "pbt":
            new, actions = pbt_step(vectors, fitness, settings, rng)
        else:
            new, actions = ga_step(vectors, fitness, settings, int(rng.integers(2**63)))
    except BaseException:
        log.exception("generation failed: resuming every model with its own weights")
        send_weights(client, streams, own, settings)
        raise
    for cid in own.keys() - vectors.keys():
        actions[cid] = f"kept: {len(own[cid])} weights, not {size}, or not finite"
    acknowledged = send_weights(client, streams, {**own, **new}, settings)
    report = EvolutionReport(
        generation=generation,
        algorithm=settings.algorithm,
        fitness=fitness,
        actions=actions,
        missing=missing,
        acknowledged=sorted(acknowledged),
        unacknowledged=sorted(own.keys() - acknowledged),
        seconds=time.monotonic() - started,
    )
    if report.unacknowledged:
        log.warning("SET not acknowledged within the timeout", models=report.unacknowledged)
    log.info("generation", generation=generation, fitness=fitness, actions=actions, seconds=report.seconds)
    return report


def format_report(report: EvolutionReport) -> str:
    lines = [f"generation {report.generation} ({report.algorithm}) in {report.seconds:.2f}s"]
    for cid in ranked(report.fitness) + sorted(report.actions.keys() - report.fitness.keys()):
        ack = "acknowledged" if cid in report.acknowledged else "NOT acknowledged"
        fitness = report.fitness.get(cid, float("nan"))
        lines.append(f"  {cid:<16} fitness {fitness:10.3f}  {report.actions[cid]:<40} {ack}")
    if report.missing:
        lines.append(f"  missing (no weights within the timeout): {', '.join(report.missing)}")
    return "\n".join(lines)


def run(settings: EvolutionSettings) -> int:
    """CLI: one generation; 0 if every live model answered and acknowledged, else 1."""
    from worker.common.connections import connect

    try:
        report = evolve(connect(settings.redis_url), settings)
    except (EvolutionError, redis.RedisError) as exc:
        print(f"evolution failed: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0 if not (report.missing or report.unacknowledged) else 1

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

**Resuming.** From its GET until its SET is acknowledged, a generation lives in the hash
``<prefix>:evolving`` (:func:`generation_key`): its number, the GET's ID, the live models it asked,
the seed of its randomness (``--seed``, or one drawn for it), the shares it took and, once sent, the
SET's ID and what it carried out. An evolution killed mid-generation leaves the models paused; the
next ``python -m worker evolution`` finds the hash and finishes that generation instead of beginning
another: before the SET, it reads the GET's replies back from ``<prefix>:weights`` and decides again
(the same seed and replies give the same SET); after it, it only waits for the acknowledgements. It
deletes the hash when done. A generation older than ``--resume-window`` seconds is not resumed (the
hash expires): its models train on after their own ``--evolution-timeout``, and its SET would
overwrite what they learned since.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import sys
import time
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
from worker.protocol import (
    Answer,
    Encoding,
    ProtocolError,
    Streams,
    decode_entry,
    encode_entry,
    parse_answer,
    parse_reply_weights,
)

log = logs.get(__name__)

REQUEST = lua.source(__package__, "evolution.lua")  # a generation's number, GET and shares, at once and once
SET = lua.source(__package__, "evolution_set.lua")  # a generation's SET, once

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
    resume_window: float = Field(
        60.0,
        gt=0,
        description="a generation interrupted less than this many seconds after its GET is finished by"
        " the next evolution; make it the models' --evolution-timeout, after which they train on",
    )


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
    resumed: bool = False  # a generation an interrupted evolution had begun


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


def generation_key(streams: Streams) -> str:
    """The hash of the generation in progress (see the module docstring)."""
    return streams.key("evolving")


@dataclass
class Generation:
    """One generation, as :func:`generation_key` remembers it from its GET until it is over."""

    number: int
    get_id: str
    cursor: str  # the weights stream's last ID before the GET: its replies come after it
    live: list[str]  # the models it asked
    seed: int  # of its randomness: a resumed generation decides as its first attempt would have
    shares: dict[str, float]  # fitness=contribution: the shares taken with the GET
    set_id: str | None = None  # once the SET went out
    set_cursor: str | None = None  # the weights stream's last ID before the SET
    outcome: dict[str, Any] | None = None  # what the SET carries out: fitness, actions, missing, named
    resumed: bool = False  # begun by an evolution that did not finish it

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes], resumed: bool) -> Generation:
        meta = {k.decode(): v.decode() for k, v in fields.items() if k.startswith(b".")}
        shares = {k.decode(): float(v) for k, v in fields.items() if not k.startswith(b".")}
        return cls(
            number=int(meta[".generation"]),
            get_id=meta[".get_id"],
            cursor=meta[".cursor"],
            live=json.loads(meta[".live"]),
            seed=int(meta[".seed"]),
            shares=shares,
            set_id=meta.get(".set_id"),
            set_cursor=meta.get(".set_cursor"),
            outcome=json.loads(meta[".outcome"]) if ".outcome" in meta else None,
            resumed=resumed,
        )


def request_weights(client: redis.Redis, streams: Streams, settings: EvolutionSettings) -> Generation:
    """The generation an interrupted evolution left, or a new one: its number, the GET and, with
    fitness=contribution, the shares taken (and reset), at once (:data:`REQUEST`).

    :raises EvolutionError: when a new generation is due and no model is live
    """
    key = generation_key(streams)
    found = client.hgetall(key)
    if b".get_id" in found:
        return Generation.from_hash(found, resumed=True)
    live = live_models(client, streams, settings.registry_max_age)
    if not live:
        raise EvolutionError(
            f"no live models (heartbeat in {streams.registry} within {settings.registry_max_age}s)"
        )
    get = encode_entry({"CMD": "GET"}, Encoding.MSGPACK)["data"]
    take = "1" if settings.fitness == "contribution" else "0"
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    keys = [streams.evolution, streams.contribution, streams.key("generation"), key]
    args = [settings.stream_maxlen, get, take, json.dumps(live), seed, last_id(client, streams.weights)]
    flat = client.register_script(REQUEST)(keys=keys, args=[*args, int(settings.resume_window * 1000)])
    return Generation.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)), resumed=False)


def await_replies(
    client: redis.Redis, stream: str, cursor: str, request_id: str, expected: set[str], timeout: float
) -> dict[str, Answer]:
    """Answers on ``stream`` after ``cursor`` to ``request_id``, by COMPONENT_ID, until all
    ``expected`` answered or ``timeout`` seconds passed (unexpected answers are kept too)."""
    replies: dict[str, Answer] = {}
    deadline = time.monotonic() + timeout
    while not expected <= replies.keys() and (remaining := deadline - time.monotonic()) > 0:
        block = max(1, int(min(remaining, 0.5) * 1000))  # never 0: that blocks forever
        for _, items in client.xread({stream: cursor}, block=block, count=1000) or []:
            for entry_id, fields in items:
                cursor = entry_id
                try:
                    answer = parse_answer(decode_entry(fields, MAX_REPLY_BYTES)[0])
                except ProtocolError:
                    continue  # names no model or no request: it answers nobody
                if answer.request_id == request_id:
                    replies[answer.component_id] = answer
    return replies


def send_weights(
    client: redis.Redis,
    streams: Streams,
    generation: Generation,
    vectors: Vectors,
    outcome: dict[str, Any],
    settings: EvolutionSettings,
) -> None:
    """The generation's one SET naming every model of ``vectors`` (:data:`SET`: never a second),
    recorded with ``outcome`` so that a restarted evolution only waits for its acknowledgements."""
    weights = {cid: np.asarray(v, dtype="<f4").tobytes() for cid, v in vectors.items()}
    data = encode_entry({"CMD": "SET", "WEIGHTS": weights}, Encoding.MSGPACK)["data"]
    outcome = {**outcome, "named": sorted(vectors)}
    keys = [streams.evolution, generation_key(streams)]
    args = [generation.get_id, settings.stream_maxlen, data, last_id(client, streams.weights)]
    args += [json.dumps(outcome), int(settings.resume_window * 1000)]
    set_id, cursor = client.register_script(SET)(keys=keys, args=args)
    generation.set_id, generation.set_cursor, generation.outcome = set_id.decode(), cursor.decode(), outcome


def await_acks(client: redis.Redis, streams: Streams, generation: Generation, timeout: float) -> set[str]:
    """The models named by the generation's SET that acknowledged it (waiting up to ``timeout``)."""
    assert generation.set_id is not None and generation.set_cursor is not None and generation.outcome
    named = set(generation.outcome["named"])
    acks = await_replies(client, streams.weights, generation.set_cursor, generation.set_id, named, timeout)
    return {cid for cid, answer in acks.items() if answer.acknowledged}


def _vector(component_id: str, weights: Any) -> np.ndarray | None:
    """A reply's flat weight vector, or ``None`` (logged) when it is not one: that model is left out
    of the SET, and resumes after its own ``--evolution-timeout``."""
    try:
        return parse_reply_weights(weights)
    except ProtocolError as exc:
        log.warning("weights rejected", component_id=component_id, reason=str(exc))
        return None


def evolve(client: redis.Redis, settings: EvolutionSettings) -> EvolutionReport:
    """Run one generation over the live models, or finish the one an interrupted evolution left;
    see the module docstring."""
    started, streams = time.monotonic(), Streams(settings.prefix)
    generation = request_weights(client, streams, settings)
    if generation.resumed:
        sent = generation.set_id is not None
        log.info("resuming generation", generation=generation.number, get_id=generation.get_id, set_sent=sent)
    if generation.outcome is None:
        decide(client, streams, generation, settings)
    outcome = generation.outcome
    assert outcome is not None
    acknowledged = await_acks(client, streams, generation, settings.timeout)
    client.delete(generation_key(streams))
    report = EvolutionReport(
        generation=generation.number,
        algorithm=outcome["algorithm"],
        fitness=outcome["fitness"],
        actions=outcome["actions"],
        missing=outcome["missing"],
        acknowledged=sorted(acknowledged),
        unacknowledged=sorted(set(outcome["named"]) - acknowledged),
        seconds=time.monotonic() - started,
        resumed=generation.resumed,
    )
    if report.unacknowledged:
        log.warning("SET not acknowledged within the timeout", models=report.unacknowledged)
    log.info(
        "generation",
        generation=report.generation,
        fitness=report.fitness,
        actions=report.actions,
        seconds=report.seconds,
        resumed=report.resumed,
    )
    return report


def decide(
    client: redis.Redis, streams: Streams, generation: Generation, settings: EvolutionSettings
) -> None:
    """Collect the GET's replies, compute fitness, vary, and send the SET (recorded on ``generation``).

    Every random draw comes from the generation's own seed, and the replies are read from the
    stream, so an evolution that resumes the generation decides what its first attempt would have.
    """
    rng = np.random.default_rng([generation.seed, generation.number])
    live, timeout = generation.live, settings.timeout
    replies = await_replies(client, streams.weights, generation.cursor, generation.get_id, set(live), timeout)
    missing = sorted(set(live) - replies.keys())
    if missing:
        log.warning("no weights within the timeout", missing=missing, timeout=timeout)
    own = {c: v for c, r in replies.items() if (v := _vector(c, r.weights)) is not None}
    if not own:
        client.delete(generation_key(streams))  # nobody to resume: nothing left to finish
        raise EvolutionError(f"none of the live models {live} sent its weights within {timeout}s")

    # Individuals must have one layout; a model of another architecture is resumed, not evolved.
    size = Counter(len(v) for v in own.values()).most_common(1)[0][0]
    vectors = {cid: v for cid, v in own.items() if len(v) == size and np.isfinite(v).all()}
    try:
        if settings.fitness == "contribution":
            fitness = {cid: generation.shares.get(cid, 0.0) for cid in vectors}
        else:
            seeds = rng.integers(2**31, size=settings.fitness_episodes).tolist()  # the same for every model
            fitness = mean_returns(vectors, settings, seeds)
        if settings.algorithm == "pbt":
            new, actions = pbt_step(vectors, fitness, settings, rng)
        else:
            new, actions = ga_step(vectors, fitness, settings, int(rng.integers(2**63)))
    except BaseException:
        log.exception("generation failed: resuming every model with its own weights")
        kept = {cid: "kept: the generation failed" for cid in own}
        outcome = {"algorithm": settings.algorithm, "fitness": {}, "actions": kept, "missing": missing}
        send_weights(client, streams, generation, own, outcome, settings)
        await_acks(client, streams, generation, timeout)
        client.delete(generation_key(streams))
        raise
    for cid in own.keys() - vectors.keys():
        actions[cid] = f"kept: {len(own[cid])} weights, not {size}, or not finite"
    outcome = {"algorithm": settings.algorithm, "fitness": fitness, "actions": actions, "missing": missing}
    send_weights(client, streams, generation, {**own, **new}, outcome, settings)


def format_report(report: EvolutionReport) -> str:
    resumed = ", resumed after an interruption" if report.resumed else ""
    lines = [f"generation {report.generation} ({report.algorithm}) in {report.seconds:.2f}s{resumed}"]
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

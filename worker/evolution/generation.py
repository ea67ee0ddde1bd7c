"""One generation through the wire, resumable: see :mod:`worker.evolution`."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from worker.common import logs, lua
from worker.common.connections import last_id
from worker.common.registry import live_models
from worker.common.serve import REDIS_ERRORS
from worker.evolution.fitness import EvolutionError, mean_returns
from worker.evolution.operators import Vectors, ga_step, pbt_step, ranked
from worker.evolution.settings import EvolutionSettings
from worker.protocol import (
    Answer,
    Encoding,
    ProtocolError,
    Streams,
    decode_entry,
    encode_entry,
    get_command,
    parse_answer,
    parse_reply_weights,
    set_command,
)

log = logs.get(__name__)

REQUEST = lua.source(__package__, "request.lua")  # a generation's number, GET and shares, at once and once
SET = lua.source(__package__, "set.lua")  # a generation's SET, once

MAX_REPLY_BYTES = 1 << 28  # replies come from our own models; only absurd sizes are refused


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
    get = encode_entry(get_command(), Encoding.MSGPACK)["data"]
    take = "1" if settings.fitness == "contribution" else "0"
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    keys = [streams.evolution, streams.contribution, streams.key("generation"), key]
    args = [settings.stream_maxlen, get, take, json.dumps(live), seed, last_id(client, streams.weights)]
    flat = client.register_script(REQUEST)(keys=keys, args=[*args, int(settings.evolution_timeout * 1000)])
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
    recorded with ``outcome`` so that a restarted evolution only waits for its acknowledgements.

    :raises EvolutionError: the generation outlived the models' pause, so no SET is sent
    """
    weights = {cid: np.asarray(v, dtype="<f4").tobytes() for cid, v in vectors.items()}
    data = encode_entry(set_command(weights), Encoding.MSGPACK)["data"]
    outcome = {**outcome, "named": sorted(vectors)}
    keys = [streams.evolution, generation_key(streams)]
    args = [generation.get_id, settings.stream_maxlen, data, last_id(client, streams.weights)]
    args += [json.dumps(outcome), int(settings.evolution_timeout * 1000)]
    sent = client.register_script(SET)(keys=keys, args=args)
    if sent is None:
        raise EvolutionError(
            f"generation {generation.number} outlived the models' pause (--evolution-timeout"
            f" {settings.evolution_timeout}s): they train on, and its SET would overwrite what they"
            " learned since; not sent"
        )
    set_id, cursor = sent
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

    # Weights moved without the observation statistics they were trained with would act on inputs
    # scaled for another model (and fitness by returns would play them unscaled): not evolved.
    if normalizing := [cid for cid in sorted(own) if normalizes(client, streams, cid)]:
        log.warning(
            "not evolved: models with --normalize-obs keep their own weights (evolution does not move"
            " their statistics)",
            models=normalizing,
        )
    # Individuals must have one layout; a model of another architecture is resumed, not evolved.
    evolvable = {cid: v for cid, v in own.items() if cid not in normalizing}
    size = Counter(len(v) for v in evolvable.values()).most_common(1)[0][0] if evolvable else 0
    vectors = {cid: v for cid, v in evolvable.items() if len(v) == size and np.isfinite(v).all()}
    fitness: dict[str, float] = {}
    new: Vectors = {}
    actions: dict[str, str] = {}
    try:
        if vectors:
            fitness, new, actions = _vary(vectors, generation, settings, rng)
    except BaseException:
        log.exception("generation failed: resuming every model with its own weights")
        kept = {cid: "kept: the generation failed" for cid in own}
        outcome = {"algorithm": settings.algorithm, "fitness": {}, "actions": kept, "missing": missing}
        send_weights(client, streams, generation, own, outcome, settings)
        await_acks(client, streams, generation, timeout)
        client.delete(generation_key(streams))
        raise
    for cid in evolvable.keys() - vectors.keys():
        actions[cid] = f"kept: {len(own[cid])} weights, not {size}, or not finite"
    for cid in normalizing:
        actions[cid] = "kept: it normalizes its observations"
    outcome = {"algorithm": settings.algorithm, "fitness": fitness, "actions": actions, "missing": missing}
    send_weights(client, streams, generation, {**own, **new}, outcome, settings)


def _vary(
    vectors: Vectors, generation: Generation, settings: EvolutionSettings, rng: np.random.Generator
) -> tuple[dict[str, float], Vectors, dict[str, str]]:
    """Fitness, the new weights and what became of each model: one PBT or GA step."""
    if settings.fitness == "contribution":
        fitness = {cid: generation.shares.get(cid, 0.0) for cid in vectors}
    else:
        seeds = rng.integers(2**31, size=settings.fitness_episodes).tolist()  # the same for every model
        fitness = mean_returns(vectors, settings, seeds)
    if settings.algorithm == "pbt":
        return fitness, *pbt_step(vectors, fitness, settings, rng)
    return fitness, *ga_step(vectors, fitness, settings, int(rng.integers(2**63)))


def normalizes(client: redis.Redis, streams: Streams, component_id: str) -> bool:
    """Whether the model normalizes its observations, as its heartbeat says."""
    return client.hget(streams.model_key(component_id, "info"), "normalize_obs") == b"1"


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

    try:
        report = evolve(settings.connect(), settings)
    except (EvolutionError, *REDIS_ERRORS) as exc:
        print(f"evolution failed: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0 if not (report.missing or report.unacknowledged) else 1

"""What the streams, the checkpoints and the logs say once a chaos run is over: the figures."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import redis

from tests.faults.chaos.config import ChaosConfig, Figures
from tests.faults.chaos.processes import AGGREGATOR, RUNNER, RUNNER_ID, Fleet
from worker.aggregator import GROUP as AGGREGATOR_GROUP
from worker.common.connections import last_id, text
from worker.model.store import ModelStore
from worker.protocol import Streams, decode_entry


@dataclass
class Observed:
    """What a model's memory rules need of one observation."""

    env: str
    has_reward: bool
    deterministic: bool


def entries(client: redis.Redis, stream: str, chunk: int = 10_000) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every entry of ``stream``, decoded (either encoding), in order."""
    low = "-"
    while True:
        items = client.xrange(stream, min=low, count=chunk)
        for entry_id, fields in items:
            yield entry_id.decode(), decode_entry(fields, 1 << 28)[0]
        if len(items) < chunk:
            return
        low = "(" + items[-1][0].decode()


def expected_counters(observed: list[Observed], n_steps: int) -> dict[str, int]:
    """The counters a model that read every one of ``observed`` must have committed.

    Per environment, as ``worker/model/memory.py`` rules (DETERMINISTIC steps not trained on): an
    observation with REWARD after a known, non-deterministic one completes a transition, every
    ``n_steps`` transitions a segment; any other observation after known ones drops the unfinished
    rollout. A segment is trained on, or discarded while evolution paused training: which of the
    two depends on timing, so ``segments`` here is their sum.
    """
    previous: dict[str, bool] = {}  # environment -> whether its last observation was deterministic
    rollout: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for o in observed:
        counts["observations"] += 1
        if o.has_reward and previous.get(o.env) is False:
            counts["transitions"] += 1
            rollout[o.env] += 1
            if rollout[o.env] == n_steps:
                counts["segments"] += 1
                rollout[o.env] = 0
        elif rollout[o.env]:
            counts["dropped"] += rollout[o.env]
            rollout[o.env] = 0
        previous[o.env] = o.deterministic
    return {key: counts[key] for key in ("observations", "transitions", "dropped", "segments")}


def implied_counters(
    client: redis.Redis, streams: Streams, model: str, n_steps: int
) -> tuple[dict[str, int], dict[str, int]]:
    """``model``'s committed counters beside what every observation on the stream implies
    (:func:`expected_counters`; segments trained and discarded summed): equal when the model learned
    from each observation once and missed none.

    :return: ``(found, wanted)``, with the keys of :func:`expected_counters`
    """
    observed = [
        Observed(m["ENV_ID"], "REWARD" in m, bool(m.get("DETERMINISTIC")))
        for _, m in entries(client, streams.observation)
    ]
    wanted = expected_counters(observed, n_steps)
    counters = asdict(ModelStore(client, streams, model).load().counters)
    found = {key: counters[key] for key in wanted}
    found["segments"] = counters["segments"] + counters["discarded"]
    return found, wanted


def drained(client: redis.Redis, streams: Streams, models: list[str]) -> bool:
    """Every group read its stream to the end and acknowledged all it read."""
    wanted = [(streams.logits, AGGREGATOR_GROUP)]
    wanted += [(s, Streams.group(m)) for m in models for s in (streams.observation, streams.evolution)]
    for stream, group in wanted:
        info = {text(g["name"]): g for g in client.xinfo_groups(stream)}[group]
        if info["pending"] or text(info["last-delivered-id"]) != last_id(client, stream):
            return False
    return True


def paused(client: redis.Redis, streams: Streams, models: list[str]) -> list[str]:
    """Models whose committed state or last heartbeat says training is paused."""
    now = time.time()
    return [
        m
        for m in models
        if ModelStore(client, streams, m).load().paused_until > now
        or client.hget(streams.model_key(m, "info"), "paused") != b"0"
    ]


def collect(
    config: ChaosConfig, client: redis.Redis, streams: Streams, fleet: Fleet, figures: Figures
) -> None:
    _answers(config, client, streams, fleet, figures)
    _evolution(client, streams, figures)
    _logs(fleet, figures)
    _learning(client, streams, figures)


def _answers(
    config: ChaosConfig, client: redis.Redis, streams: Streams, fleet: Fleet, figures: Figures
) -> None:
    """Each observation: one action, one reply per model; each model's counters what that implies."""
    observed, ids = [], []
    for entry_id, m in entries(client, streams.observation):
        ids.append(entry_id)
        observed.append(Observed(m["ENV_ID"], "REWARD" in m, bool(m.get("DETERMINISTIC"))))
    figures.observations = len(ids)
    actions: Counter[str] = Counter()
    for _, m in entries(client, streams.replies(RUNNER_ID)):
        actions[m["OBS_ID"]] += 1
        figures.actions_partial += m["MODELS"] < config.models
    figures.actions = sum(actions.values())
    figures.actions_missing = sum(actions[i] == 0 for i in ids)
    figures.actions_duplicate = sum(c - 1 for c in actions.values() if c > 1)
    replies = Counter((m["COMPONENT_ID"], m["OBS_ID"]) for _, m in entries(client, streams.logits))
    figures.replies_expected = len(ids) * len(fleet.models)
    figures.replies = sum(replies.values())
    for model in fleet.models:
        counts = [replies[(model, i)] for i in ids]
        figures.lost += sum(c == 0 for c in counts)
        figures.duplicates += sum(c - 1 for c in counts if c > 1)

    expected = {**expected_counters(observed, config.n_steps), "dead": 0, "skipped": 0, "forgotten": 0}
    commands = [(m["CMD"], set(m.get("WEIGHTS") or {})) for _, m in entries(client, streams.evolution)]
    for model in fleet.models:
        counters = asdict(ModelStore(client, streams, model).load().counters)
        found = {key: counters[key] for key in expected}
        found["segments"] = counters["segments"] + counters["discarded"]
        wanted = {**expected, "commands": sum(cmd == "GET" or model in named for cmd, named in commands)}
        found["commands"] = counters["commands"]
        if found != wanted:
            figures.counter_mismatches.append(f"{model}: {found} != {wanted}")
        # Updates are not a function of the input: one batch is one update, and a restarted worker
        # replays its backlog in bigger batches. Each update trains at least one of the batch's
        # segments and a batch of B entries completes at most B of them.
        if (
            not math.ceil(counters["segments"] / config.batch_size)
            <= counters["updates"]
            <= counters["segments"]
        ):
            figures.counter_mismatches.append(f"{model}: {counters['updates']} updates")
        figures.segments[model] = counters["segments"]
        figures.discarded[model] = counters["discarded"]
        figures.updates[model] = counters["updates"]
        figures.dropped[model] = counters["dropped"]
        figures.commands[model] = counters["commands"]
        for stream in (streams.observation, streams.evolution):
            figures.pending += client.xpending(stream, Streams.group(model))["pending"]
    figures.pending += client.xpending(streams.logits, AGGREGATOR_GROUP)["pending"]
    figures.counters_exact = not figures.counter_mismatches
    figures.dead = client.xlen(streams.dead)


def _evolution(client: redis.Redis, streams: Streams, figures: Figures) -> None:
    """One SET after each GET; the models that answered a GET but were not named by its SET."""
    generations: list[tuple[str, list[set[str]]]] = []  # GET ID, the models named by each SET after it
    for entry_id, m in entries(client, streams.evolution):
        if m["CMD"] == "GET":
            generations.append((entry_id, []))
        elif generations:
            generations[-1][1].append(set(m["WEIGHTS"]))
    figures.gets = len(generations)
    figures.sets = sum(len(sets) for _, sets in generations)
    figures.sets_not_one_per_get = sum(len(sets) != 1 for _, sets in generations)
    answered: dict[str, set[str]] = {}
    for _, m in entries(client, streams.weights):
        if "WEIGHTS" in m:
            answered.setdefault(m["REQUEST_ID"], set()).add(m["COMPONENT_ID"])
    for get_id, sets in generations:
        named = set().union(*sets) if sets else set()
        figures.pauses_left_to_timeout += len(answered.get(get_id, set()) - named)


def _logs(fleet: Fleet, figures: Figures) -> None:
    """Model reconnections; what the restarted aggregator and runner said when they came up."""
    runs: Counter[str] = Counter()
    for incarnation in fleet.history:
        name, ready = incarnation.name, incarnation.ready or {}
        if name == AGGREGATOR and incarnation.number > 0:
            figures.aggregator_rebuilt += int(ready.get("pending", 0))
        elif name == RUNNER:
            started: set[str] = set()  # runs it began and did not end
            for line in incarnation.lines:
                if line["event"] == "run":
                    started.add(line["run_id"])
                elif line["event"] in ("run done", "run aborted"):
                    started.discard(line.get("run_id", ""))
            figures.runner_kills_mid_run += incarnation.killed and bool(started)
            figures.runner_restarts_ready += incarnation.number > 0 and bool(ready)
            figures.runner_resumed += incarnation.number > 0 and ready.get("resumed") is not None
            runs.update({line["run_id"] for line in incarnation.lines if line["event"] == "run"})
        elif name in fleet.models:
            figures.incarnations += 1
            n = incarnation.events["reconnected"]
            figures.reconnects += n
            figures.reconnects_per_model[name] = figures.reconnects_per_model.get(name, 0) + n
            failed = incarnation.events["redis unavailable, retrying"]
            figures.unreachable_per_model[name] = figures.unreachable_per_model.get(name, 0) + failed
    figures.runs_rerun = sum(n > 1 for n in runs.values())


def _learning(client: redis.Redis, streams: Streams, figures: Figures) -> None:
    """Training episodes (the runner's episode reports), in the order they ended."""
    returns, lengths = [], []
    for _, m in entries(client, streams.status):
        if m.get("EVENT") == "episode" and "-eval-" not in m["ENV_ID"]:
            returns.append(float(m["RETURN"]))
            lengths.append(int(m["LENGTH"]))
    figures.episodes = len(returns)
    if len(returns) >= 5:
        fifth = len(returns) // 5
        figures.return_first_fifth = float(np.mean(returns[:fifth]))
        figures.return_last_fifth = float(np.mean(returns[-fifth:]))
        ends = np.cumsum(lengths)
        tenth = np.minimum(ends * 10 // max(int(ends[-1]), 1), 9)
        figures.curve = [
            float(np.mean(np.asarray(returns)[tenth == i])) for i in range(10) if (tenth == i).any()
        ]

"""``python -m worker control train``: run training rounds (episodes, evaluation, evolution) and report.

It repeats what the tutorial's control script did: E training episodes on the environment runners,
an evaluation with deterministic actions, then one evolution step; it draws a progress bar and, with
``--plot``, a learning curve.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import Field
from tqdm import tqdm

from worker.aggregator import GROUP as AGGREGATOR_GROUP
from worker.common import logs
from worker.common.board import RoundBoard
from worker.common.connections import last_id, text
from worker.common.registry import live_models
from worker.common.serve import Outages, ride_out
from worker.evolution.fitness import EvolutionError
from worker.evolution.generation import evolve as evolve_generation
from worker.evolution.settings import EvolutionSettings
from worker.protocol import (
    Encoding,
    ProtocolError,
    Run,
    RunReport,
    Streams,
    decode_entry,
    encode_entry,
    parse_run_report,
    run_command,
)

log = logs.get(__name__)


@dataclass
class RoundResult:
    """One point of the learning curve."""

    round: int
    train_steps: int  # environment steps used for training so far
    train_return: float  # mean return of this round's training episodes
    eval_return: float  # mean deterministic return of the evaluation episodes
    train_seconds: float  # wall-clock spent in training runs so far
    seconds: float  # wall-clock since training started, evaluations and evolution included
    # Per live model, its policy lag so far as of its last heartbeat (Learner.lag's summary).
    policy_lag: dict[str, dict[str, float]] = field(default_factory=dict)


def run_episodes(
    client: redis.Redis,
    streams: Streams,
    *,
    episodes: int | None = None,
    steps: int | None = None,
    deterministic: bool = False,
    runners: int = 1,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Ask the environment runners for one run and wait for all ``runners`` reports.

    Redis refusing writes or unreachable for a while (an outage, see :mod:`worker.common.serve`)
    is ridden out as the runners ride it out: backing off, logged once.

    :return: ``{"episodes", "steps", "mean_return", "returns"}`` summed over the runners
    :raises RuntimeError: when a runner reports an error or the reports do not come in time
    """
    run_id = uuid.uuid4().hex[:12]
    outages = Outages(client, log)
    outages.attach()
    cursor = ride_out(outages, last_id, client, streams.status)
    command = run_command(Run(run_id, episodes, steps, deterministic))
    entry = encode_entry(command, Encoding.MSGPACK)
    ride_out(outages, client.xadd, streams.control, entry, maxlen=1000, approximate=True)
    reports: dict[str, RunReport] = {}  # by runner: a RUN resent after a lost reply is reported twice
    deadline = time.monotonic() + timeout
    while len(reports) < runners:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"run {run_id}: {len(reports)} of {runners} runner reports after {timeout}s")
        block = int(min(remaining, 1.0) * 1000)
        reply = ride_out(outages, client.xread, {streams.status: cursor}, block=block, count=100)
        for _, items in reply or []:
            for entry_id, fields in items:
                cursor = entry_id.decode()
                try:
                    report = parse_run_report(decode_entry(fields or {}, 1 << 24)[0])
                except ProtocolError as exc:
                    log.warning("unreadable status entry skipped", id=cursor, error=str(exc))
                    continue
                if report is None or report.run_id != run_id:
                    continue  # an episode's report, or another run's
                if report.error is not None:
                    raise RuntimeError(f"run {run_id} failed: {report.error}")
                reports.setdefault(report.runner_id or cursor, report)
    returns = [r for report in reports.values() for r in report.returns]
    return {
        "episodes": sum(r.episodes for r in reports.values()),
        "steps": sum(r.steps for r in reports.values()),
        "returns": returns,
        "mean_return": sum(returns) / len(returns) if returns else float("nan"),
    }


def wait_for_loop(
    client: redis.Redis, streams: Streams, runners: list[str], since: float, timeout: float = 120.0
) -> None:
    """Wait until the aggregator reads the logits and each of ``runners`` is ready (after ``since``,
    unix seconds): a RUN or a reply sent before would be missed."""
    deadline = time.monotonic() + timeout
    while True:
        groups = client.xinfo_groups(streams.logits) if client.exists(streams.logits) else []
        aggregator = any(text(g["name"]) == AGGREGATOR_GROUP for g in groups)
        ready = [client.hget(streams.runner_key(r), "ready") for r in runners]
        if aggregator and all(t is not None and float(t) >= since for t in ready):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"aggregator or runners {runners} not ready after {timeout}s")
        time.sleep(0.05)


def policy_lags(client: redis.Redis, streams: Streams) -> dict[str, dict[str, float]]:
    """Each live model's policy lag, as its last heartbeat reported it."""
    lags = {}
    for cid in live_models(client, streams):
        found = client.hget(streams.model_key(cid, "info"), "policy_lag")
        if found is not None:
            lags[cid] = json.loads(found)
    return lags


def wait_for_models(client: redis.Redis, streams: Streams, count: int, timeout: float = 120.0) -> list[str]:
    """Block until ``count`` models heartbeat in the registry."""
    deadline = time.monotonic() + timeout
    while len(models := live_models(client, streams)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(models)} of {count} models live after {timeout}s")
        time.sleep(0.2)
    return models


def train(
    client: redis.Redis,
    streams: Streams,
    *,
    rounds: int,
    episodes: int | None,
    steps: int | None,
    eval_episodes: int,
    evolve: Any | None = None,
    target: float | None = None,
    runners: int = 1,
    run_timeout: float = 600.0,
    progress: bool = True,
    on_round: Callable[[RoundResult], None] | None = None,
) -> list[RoundResult]:
    """Rounds of training, evaluation and (if ``evolve`` is given) one evolution step each.

    :param evolve: a callable doing one generation (:func:`~worker.evolution.generation.evolve`,
        bound to its settings)
    :param target: stop early once the evaluation's mean return reaches it
    :param on_round: called with each round's point (``--tensorboard-log``'s writer)
    """
    curve: list[RoundResult] = []
    started, train_steps, train_seconds = time.monotonic(), 0, 0.0
    bar = tqdm(range(1, rounds + 1), desc="rounds", unit="round", disable=not progress)
    for r in bar:
        run_started = time.monotonic()
        trained = run_episodes(
            client, streams, episodes=episodes, steps=steps, runners=runners, timeout=run_timeout
        )
        train_seconds += time.monotonic() - run_started
        train_steps += trained["steps"]
        evaluated = run_episodes(
            client, streams, episodes=eval_episodes, deterministic=True, runners=runners, timeout=run_timeout
        )
        point = RoundResult(
            r,
            train_steps,
            trained["mean_return"],
            evaluated["mean_return"],
            train_seconds,
            time.monotonic() - started,
            policy_lags(client, streams),
        )
        curve.append(point)
        bar.set_postfix(steps=train_steps, train=f"{point.train_return:.1f}", eval=f"{point.eval_return:.1f}")
        lags = {cid: lag.get("mean") for cid, lag in point.policy_lag.items()}
        log.info("round", **{**asdict(point), "policy_lag": lags})
        if on_round is not None:
            on_round(point)
        if target is not None and point.eval_return >= target:
            break
        if evolve is not None and r < rounds:  # the last evaluation stands for the final population
            evolve()
    bar.close()
    return curve


def plot(curve: list[RoundResult], path: str, title: str = "CartPole-v1 through Redis Streams") -> None:
    """Learning curve: mean training and evaluation return against environment steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p.train_steps for p in curve]
    ax.plot(steps, [p.train_return for p in curve], marker="o", label="training episodes (sampled)")
    ax.plot(steps, [p.eval_return for p in curve], marker="s", label="evaluation (deterministic)")
    ax.set_xlabel("environment steps (training)")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_table(curve: list[RoundResult]) -> str:
    lines = ["| round | env steps | train return | eval return | train s | total s |", "|---:" * 6 + "|"]
    lines += [
        f"| {p.round} | {p.train_steps} | {p.train_return:.1f} | {p.eval_return:.1f} "
        f"| {p.train_seconds:.1f} | {p.seconds:.1f} |"
        for p in curve
    ]
    return "\n".join(lines)


class TrainSettings(EvolutionSettings):
    """``python -m worker control train``: rounds of training, evaluation and one evolution step.

    The A2C flags describe the models' policy (evolution evaluates the weights it collects with it).
    """

    rounds: int = Field(10, gt=0, description="training rounds (stop earlier once --target is reached)")
    models: int = Field(1, gt=0, description="wait until this many models are live before the first round")
    episodes: int | None = Field(None, gt=0, description="training episodes per round (per runner)")
    steps: int | None = Field(
        10_000, gt=0, description="or: training environment steps per round (per runner)"
    )
    eval_episodes: int = Field(20, gt=0, description="deterministic evaluation episodes per round")
    runners: int = Field(1, gt=0, description="environment runners that answer each run")
    run_timeout: float = Field(600.0, gt=0, description="seconds a run may take")
    evolve: bool = Field(True, description="one evolution step between rounds (with 2+ live models)")
    target: float | None = Field(None, description="stop once the evaluation's mean return reaches this")
    plot: str | None = Field(None, description="write the learning curve to this PNG")
    progress: bool = Field(True, description="draw a progress bar")
    tensorboard_log: str | None = Field(
        None,
        description="TensorBoard under SB3's names: each round's returns in DIR/control (the demo: each"
        " model's scalars in DIR/<component ID> too)",
    )


def evolve_through_outages(client: redis.Redis, settings: EvolutionSettings) -> None:
    """One generation, ridden through outages: a generation cut short by one is resumed by the next
    attempt (``<prefix>:evolving``), so it still sends one GET and one SET. A generation that cannot
    take place (no weights within the timeout: models too slow on a loaded machine, say) is logged
    and skipped; training goes on, every model with its own weights."""
    outages = Outages(client, log)
    outages.attach()
    try:
        ride_out(outages, evolve_generation, client, settings)
    except EvolutionError as exc:
        log.warning("generation skipped: training goes on", error=str(exc))


def train_rounds(client: redis.Redis, settings: TrainSettings) -> list[RoundResult]:
    """:func:`train` with everything taken from ``settings``; evolution only with 2+ live models."""
    streams = Streams(settings.prefix)
    models = live_models(client, streams)
    evolve = None
    if settings.evolve and len(models) > 1:
        evolve = lambda: evolve_through_outages(client, settings)  # noqa: E731
    log.info("training", models=models, evolve=evolve is not None, rounds=settings.rounds)
    board = RoundBoard(settings.tensorboard_log) if settings.tensorboard_log else None
    try:
        return train(
            client,
            streams,
            rounds=settings.rounds,
            episodes=settings.episodes,
            steps=settings.steps if settings.episodes is None else None,
            eval_episodes=settings.eval_episodes,
            evolve=evolve,
            target=settings.target,
            runners=settings.runners,
            run_timeout=settings.run_timeout,
            progress=settings.progress,
            on_round=board,
        )
    finally:
        if board is not None:
            board.close()


def report(curve: list[RoundResult], settings: TrainSettings) -> None:
    """Print the curve's numbers (and write its picture when asked)."""
    print(curve_table(curve))
    if settings.plot and curve:
        plot(curve, settings.plot)
        print(f"learning curve: {Path(settings.plot).resolve()}")


def run_train(settings: TrainSettings) -> int:

    client = settings.connect()
    wait_for_models(client, Streams(settings.prefix), settings.models)
    curve = train_rounds(client, settings)
    report(curve, settings)
    return 0

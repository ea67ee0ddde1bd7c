"""A chaos run: start the loop, drive its rounds while the fault loop kills and restarts at random
(seeded) moments, let it settle, stop it, and gather the figures."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.faults.chaos.checks import collect, drained, paused
from tests.faults.chaos.config import ChaosConfig, Figures, say
from tests.faults.chaos.processes import AGGREGATOR, RUNNER, Fleet, RedisServer
from tests.faults.chaos.rounds import Rounds
from worker.aggregator import GROUP as AGGREGATOR_GROUP
from worker.common.connections import connect, ensure_group
from worker.protocol import Streams


@contextmanager
def _redis(config: ChaosConfig, workdir: Path) -> Iterator[RedisServer | None]:
    if config.redis_url:
        yield None
        return
    directory = workdir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str, tick: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        tick()
        time.sleep(0.05)


def run(config: ChaosConfig) -> Figures:
    """Drive the loop through the faults; return the figures (check :meth:`Figures.ok`)."""
    began = time.monotonic()
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="rl-chaos-"))
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    figures = Figures(models=config.models, envs=config.envs)
    with _redis(config, workdir) as server:
        url = config.redis_url or server.url  # type: ignore[union-attr]
        client = connect(url)
        streams = Streams(config.prefix)
        if client.exists(streams.observation):
            raise SystemExit(f"{streams.observation} exists on {url}: use a fresh --prefix")
        fleet = Fleet(config, url, client, logdir, figures)
        # Every model must see every observation and command, the aggregator every reply: groups first.
        for model in fleet.models:
            for stream in (streams.observation, streams.evolution):
                ensure_group(client, stream, Streams.group(model))
        ensure_group(client, streams.logits, AGGREGATOR_GROUP)
        rounds = Rounds(config, url, logdir, figures)
        try:
            for name in fleet.names:
                fleet.start(name)
            _wait(fleet.all_ready, 180, "the loop to start", fleet.poll)
            say(config, f"{len(fleet.names)} processes ready; logs in {logdir}")
            rounds.start()
            _faults(config, fleet, rounds, server)
            rounds.finish.set()
            say(config, f"faults done after {figures.steps} training steps; last round, then the backlog")
            _wait(
                lambda: not rounds.is_alive(),
                config.run_timeout * 3,
                "the last round",
                _checking(fleet, rounds),
            )
            _wait(
                lambda: drained(client, streams, fleet.models),
                config.settle_timeout,
                "every reply",
                fleet.poll,
            )
            # A model that answered a GET after its generation gave up on it waits out its timeout.
            timeout = config.evolution_timeout + 30
            _wait(lambda: not paused(client, streams, fleet.models), timeout, "no model paused", fleet.poll)
            _wait(fleet.all_ready, 60, "the last restarts to report", fleet.poll)
            figures.paused_at_end = paused(client, streams, fleet.models)
            fleet.stop()
        finally:
            rounds.close()
            fleet.close()
        collect(config, client, streams, fleet, figures)
        client.close()
    figures.seconds = time.monotonic() - began
    if not config.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def _pause(seconds: float, tick: Callable[[], None]) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        tick()
        time.sleep(0.05)


def _checking(fleet: Fleet, rounds: Rounds) -> Callable[[], None]:
    """A tick that restarts crashed processes and surfaces an error of the rounds."""

    def tick() -> None:
        fleet.poll()
        if rounds.error is not None:
            raise rounds.error

    return tick


def _faults(config: ChaosConfig, fleet: Fleet, rounds: Rounds, server: RedisServer | None) -> None:
    """The faults, shuffled (seeded), one every ``gap`` seconds, until all are done (evolution kills
    are owed to the rounds, which do them mid-generation) and the rounds drove ``min_steps``."""
    rng = np.random.default_rng(config.seed + 1)
    faults = ["model"] * config.kills + ["evolution"] * config.evolution_kills
    faults += [AGGREGATOR] * config.aggregator_kills + [RUNNER] * config.runner_kills
    faults += ["redis"] * config.redis_restarts if server else []
    rng.shuffle(faults)
    tick = _checking(fleet, rounds)
    next_fault = time.monotonic() + rng.uniform(*config.gap)
    while faults or rounds.owed or rounds.figures.steps < config.min_steps:
        tick()
        if faults and time.monotonic() >= next_fault:
            fault = faults.pop()
            if fault == "model":
                _kill_model(config, fleet, rng)
            elif fault == "evolution":
                rounds.owe_kill()
            elif fault == "redis":
                _restart_redis(config, server, rng, fleet.figures)  # type: ignore[arg-type]
            else:
                if rng.random() < 0.85:  # most often while it has work in hand: in a run
                    _wait(lambda: rounds.phase in RUNNING, config.run_timeout, "a run", tick)
                    _pause(rng.uniform(0.0, 1.5), tick)  # into it
                _kill_component(config, fleet, fault, rounds.phase)
            next_fault = time.monotonic() + rng.uniform(*config.gap)
        time.sleep(0.05)


def _kill_model(config: ChaosConfig, fleet: Fleet, rng: np.random.Generator) -> None:
    """SIGKILL a random model worker (most often one that is serving) and start it again."""
    serving = [m for m in fleet.models if fleet.current[m].ready is not None]
    model = str(rng.choice(serving if serving and rng.random() < 0.85 else fleet.models))
    incarnation = fleet.kill(model)
    fleet.figures.kills += 1
    fleet.figures.killed_before_ready += incarnation.ready is None
    restarted = fleet.start(model)
    say(config, f"kill {fleet.figures.kills}: {model}.{incarnation.number}, checkpoint {restarted.expect}")


RUNNING = ("training", "evaluating")  # phases of the rounds in which a RUN is being executed


def _kill_component(config: ChaosConfig, fleet: Fleet, name: str, phase: str) -> None:
    """SIGKILL the aggregator or the runner and start it again with the same ID."""
    incarnation = fleet.kill(name)
    figures = fleet.figures
    if name == AGGREGATOR:
        figures.aggregator_kills += 1
    else:
        figures.runner_kills += 1
    fleet.start(name)
    say(config, f"{name} kill: {name}.{incarnation.number} while the rounds were {phase}")


def _restart_redis(
    config: ChaosConfig, server: RedisServer, rng: np.random.Generator, figures: Figures
) -> None:
    how = "kill" if figures.redis_restarts % 2 == 0 else "shutdown"
    server.stop(how)
    down = rng.uniform(*config.outage)
    time.sleep(down)
    server.start()
    figures.redis_restarts += 1
    say(config, f"redis restart {figures.redis_restarts}: {how}, down {down:.1f} s")

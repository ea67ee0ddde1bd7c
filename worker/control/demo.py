"""``python -m worker demo``: the whole loop on one machine, until CartPole-v1 is solved.

It starts (as separate processes, exactly as ``docker compose --profile swarm up`` would) the model
workers, the aggregator and an environment runner, on the Redis at ``REDIS_URL`` or else on a private
``redis-server`` it starts and stops itself; then it trains in rounds (training episodes,
deterministic evaluation, one evolution step) until the evaluation's mean return reaches the target.
The last line printed is the final mean deterministic return; the exit code is 0 only when solved.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from worker.common import logs
from worker.common.connections import connect
from worker.common.servers import embedded_cluster, embedded_redis
from worker.control.train import (
    RoundResult,
    TrainSettings,
    report,
    train_rounds,
    wait_for_loop,
    wait_for_models,
)
from worker.model.settings import A2CSettings
from worker.protocol import Encoding, Streams, encode_entry, stop_command

log = logs.get(__name__)


class DemoSettings(TrainSettings):
    """``python -m worker demo``: start everything and train until solved or out of budget."""

    redis_url: str | None = Field(  # type: ignore[assignment]
        None,
        validation_alias=AliasChoices("redis_url"),
        description="Redis to use; unset: start a private redis-server (with --cluster, a Redis Cluster of"
        " 3 primaries and 3 replicas); env REDIS_URL",
    )
    models: int = Field(2, gt=0, description="model workers in the swarm")
    evolve: bool = Field(
        False,
        description="one evolution step between rounds (with 2+ models); off: at equal steps it did not"
        " help (README, 'Does evolution help?')",
    )
    n_envs: int = Field(8, gt=0, description="parallel environments")
    rounds: int = Field(40, gt=0, description="budget: training rounds")
    target: float | None = Field(475.0, description="mean evaluation return that counts as solved")
    plot: str | None = Field("demo-curve.png", description="where to write the learning-curve PNG")
    mode: Literal["ensemble", "direct", "local"] = Field(
        "ensemble",
        description="how the runner acts: through the aggregator, asking the first model directly,"
        " or with a local copy of its policy",
    )
    runners: int = Field(1, gt=0, description="environment runner processes, --n-envs environments each")
    stepping: Literal["lockstep", "async"] = Field(
        "lockstep", description="how the runners step their environments (python -m worker env --stepping)"
    )


@contextlib.contextmanager
def redis_for(settings: DemoSettings) -> Iterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    if settings.cluster:
        with embedded_cluster() as cluster:
            log.info("started a private Redis Cluster", url=cluster.url, nodes=len(cluster.ports))
            yield cluster.url
        return
    with embedded_redis() as url:
        log.info("started a private redis-server", url=url)
        yield url


def model_flags(settings: A2CSettings) -> list[str]:
    """The hyper-parameters of ``settings`` as ``python -m worker model`` flags."""
    flags = []
    for name in A2CSettings.model_fields:
        if name == "seed":
            continue  # every model gets its own
        value = getattr(settings, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict | list):
            import json

            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


class Swarm:
    """The processes of one demo, their logs in one folder, stopped with SIGTERM on exit."""

    def __init__(self, url: str, prefix: str, logdir: Path, cluster: bool = False) -> None:
        self.env = {**os.environ, "REDIS_URL": url, "STREAM_PREFIX": prefix, "REDIS_CLUSTER": str(cluster)}
        self.logdir = logdir
        self.processes: dict[str, subprocess.Popen] = {}  # by name, as their logs

    def start(self, name: str, *args: str) -> None:
        out = open(self.logdir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        command = [sys.executable, "-m", "worker", *args]
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        for process in self.processes.values():
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(process.args[2:])} exited with {process.returncode}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def runner_names(runners: int) -> list[str]:
    """The runners' IDs: ``demo`` alone, else ``demo-0``, ``demo-1``, ... (each its own ENV_IDs)."""
    return ["demo"] if runners == 1 else [f"demo-{k}" for k in range(runners)]


def train_swarm(settings: DemoSettings) -> list[RoundResult]:
    """Start the swarm, train it in rounds until the target or the budget, stop it; the curve."""
    streams = Streams(settings.prefix)
    logdir = Path(tempfile.mkdtemp(prefix="rl-demo-"))
    with redis_for(settings) as url:
        client = connect(url, cluster=settings.cluster)
        swarm, started = Swarm(url, settings.prefix, logdir, settings.cluster), time.time()
        try:
            board = ["--tensorboard-log", settings.tensorboard_log] if settings.tensorboard_log else []
            for i in range(settings.models):
                seed = [] if settings.seed is None else ["--seed", str(settings.seed + i)]
                flags = [*model_flags(settings), *seed, *board]
                swarm.start(f"model-{i}", "model", "--component-id", f"demo-{i}", *flags)
            seed = [] if settings.seed is None else ["--seed", str(settings.seed)]
            swarm.start("aggregator", "aggregator", *seed)
            mode = ["--mode", settings.mode] + (["--model", "demo-0"] if settings.mode != "ensemble" else [])
            runner = ["--gym-env", str(settings.gym_env), "--n-envs", str(settings.n_envs)]
            runner += [*mode, "--stepping", settings.stepping]
            runner_ids = runner_names(settings.runners)
            for k, runner_id in enumerate(runner_ids):
                # A runner's envs take seeds seed ... seed + 2 * n_envs - 1: the next runner's follow.
                first = None if settings.seed is None else settings.seed + 2 * k * settings.n_envs
                seed = [] if first is None else ["--seed", str(first)]
                swarm.start(runner_id, "env", *runner, "--runner-id", runner_id, *seed)
            print(f"logs of the swarm: {logdir}", flush=True)
            wait_for_models(client, streams, settings.models)
            wait_for_loop(client, streams, runner_ids, since=started)
            swarm.check()
            return train_rounds(client, settings.model_copy(update={"redis_url": url}))
        finally:
            with contextlib.suppress(Exception):
                stop = encode_entry(stop_command(), Encoding.MSGPACK)
                client.xadd(streams.control, stop, maxlen=1000, approximate=True)
            swarm.stop()


def run(settings: DemoSettings) -> int:
    curve = train_swarm(settings)
    if not curve:
        print("final mean deterministic return: n/a (no round finished)")
        return 1
    report(curve, settings)
    final = curve[-1]
    solved = final.eval_return >= (settings.target or float("inf"))
    print(
        f"final mean deterministic return: {final.eval_return:.1f} over {settings.eval_episodes} episodes "
        f"after {final.train_steps} environment steps ({'solved' if solved else 'not solved'})"
    )
    return 0 if solved else 1

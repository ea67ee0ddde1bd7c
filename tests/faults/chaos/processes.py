"""The processes of a chaos run: a private Redis that can be stopped and started again, and the
loop's long-running components (model workers, the aggregator, an environment runner), each
restarted with the same ID after a kill, with what their JSON logs said."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.faults.chaos.config import ChaosConfig, Figures
from worker.common.servers import free_port
from worker.model.store import digest
from worker.protocol import Streams

ROOT = Path(__file__).resolve().parents[3]
AGGREGATOR, RUNNER = "aggregator", "runner"
RUNNER_ID = "chaos"


class RedisServer:
    """A private redis-server with an AOF (every write fsynced) that can be stopped and started again."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = free_port()
        self.directory = directory
        self.args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always",
        ]  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    probe.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError):  # includes LOADING
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start: {' '.join(self.args)}") from None
                    time.sleep(0.02)
        finally:
            probe.close()

    def stop(self, how: str = "kill") -> None:
        """``kill``: SIGKILL, as a crash; ``shutdown``: SHUTDOWN (the AOF is flushed)."""
        assert self.process is not None
        if how == "shutdown":
            with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it exits
                redis.Redis.from_url(self.url).shutdown()
        else:
            self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Incarnation:
    """One process of a component (a model, the aggregator, the runner, one evolution)."""

    name: str
    number: int
    process: subprocess.Popen
    log_path: Path
    expect: dict[str, Any] | None  # a model's checkpoint in Redis when it started (None: none there)
    ready: dict[str, Any] | None = None
    events: Counter = field(default_factory=Counter)
    lines: list[dict[str, Any]] = field(default_factory=list)  # every JSON log line read
    offset: int = 0
    killed: bool = False

    def read_log(self) -> list[dict[str, Any]]:
        """New JSON log lines since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = []
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # warnings of imported libraries, tracebacks, reports: kept in the log file
            if isinstance(line, dict) and "event" in line:
                self.events[line["event"]] += 1
                if line["event"] == "ready":
                    self.ready = line
                lines.append(line)
        self.lines += lines
        return lines

    def kill(self) -> None:
        self.killed = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def spawn(args: list[str], log_path: Path, name: str = "", number: int = 0) -> Incarnation:
    """Start ``args`` (a command line) from the repository root, its output in ``log_path``."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    return Incarnation(name, number, process, log_path, None)


def component_command(url: str, command: str, *extra: str, prefix: str = "rl") -> list[str]:
    """``python -m worker <command>`` on ``url``, logging JSON lines."""
    return [
        sys.executable, "-m", "worker", command, "--redis-url", url, "--prefix", prefix, "--log-json", *extra,
    ]  # fmt: skip


def worker_command(
    url: str, model: str, *extra: str, module: str = "worker", prefix: str = "rl"
) -> list[str]:
    """``python -m <module> model`` for ``model`` on ``url``, logging JSON lines."""
    return [
        sys.executable, "-m", module, "model", "--redis-url", url, "--prefix", prefix,
        "--component-id", model, "--log-json", *extra,
    ]  # fmt: skip


def checkpoint_digests(client: redis.Redis, streams: Streams, model: str) -> dict[str, Any] | None:
    """What a worker that loads ``model`` now must report: version and digests of the blobs."""
    checkpoint = client.hgetall(streams.model_key(model, "checkpoint"))
    if b"policy" not in checkpoint:
        return None
    return {
        "checkpoint_version": int(checkpoint[b"version"]),
        "policy_sha": digest(checkpoint[b"policy"]),
        "optimizer_sha": digest(checkpoint[b"optimizer"]),
    }


class Fleet:
    """The long-running processes, one live incarnation per name, and what their logs said."""

    def __init__(
        self, config: ChaosConfig, url: str, client: redis.Redis, logdir: Path, figures: Figures
    ) -> None:
        self.config, self.url, self.logdir, self.figures = config, url, logdir, figures
        self.client, self.streams = client, Streams(config.prefix)
        self.models = [f"chaos-{i}" for i in range(config.models)]
        self.names = [*self.models, AGGREGATOR, RUNNER]
        self.current: dict[str, Incarnation] = {}
        self.history: list[Incarnation] = []

    def command(self, name: str) -> list[str]:
        c, p = self.config, self.config.prefix
        if name == AGGREGATOR:
            return component_command(
                self.url, "aggregator", "--seed", str(c.seed), "--deadline-ms", "300",
                "--registry-max-age", "2", "--stream-maxlen", "100000000", prefix=p,
            )  # fmt: skip
        if name == RUNNER:
            return component_command(
                self.url, "env", "--n-envs", str(c.envs), "--runner-id", RUNNER_ID, "--seed", str(c.seed),
                "--no-trim-replies",  # its actions stay, to be counted
                "--block-ms", "200", "--stream-maxlen", "100000000", prefix=p,
            )  # fmt: skip
        return worker_command(
            self.url, name,
            "--seed", str(self.models.index(name)), "--n-steps", str(c.n_steps),
            "--learning-rate", str(c.learning_rate), "--batch-size", str(c.batch_size),
            "--lease-ttl", str(c.lease_ttl), "--heartbeat-interval", "0.3",
            "--claim-idle-ms", str(c.claim_idle_ms), "--stream-maxlen", "100000000",
            "--evolution-timeout", str(c.evolution_timeout),
            prefix=p,
        )  # fmt: skip

    def start(self, name: str) -> Incarnation:
        """Start ``name``; no other process of it may run (a model's checkpoint is what it must load)."""
        expect = checkpoint_digests(self.client, self.streams, name) if name in self.models else None
        number = sum(i.name == name for i in self.history)
        incarnation = spawn(self.command(name), self.logdir / f"{name}.{number}.log", name, number)
        incarnation.expect = expect
        self.current[name] = incarnation
        self.history.append(incarnation)
        return incarnation

    def kill(self, name: str) -> Incarnation:
        incarnation = self.current[name]
        incarnation.kill()
        self.check(incarnation)
        return incarnation

    def check(self, incarnation: Incarnation) -> None:
        """Read new log lines; once a model is ready, compare its loaded state with the checkpoint."""
        had_ready = incarnation.ready is not None
        incarnation.read_log()
        if incarnation.ready is None or had_ready or incarnation.name not in self.models:
            return
        ready, expect = incarnation.ready, incarnation.expect
        name = f"{incarnation.name}.{incarnation.number}"
        if incarnation.number > 0 and ready.get("reclaimed"):
            self.figures.kills_in_flight += 1
        if expect is None:
            if ready.get("restored"):
                self.figures.resume_mismatches.append(f"{name}: restored a checkpoint that was not there")
            return
        found = {key: ready.get(key) for key in expect}
        if ready.get("restored") and found == expect:
            self.figures.resumes_verified += 1
        else:
            self.figures.resume_mismatches.append(f"{name}: loaded {found}, checkpoint was {expect}")

    def poll(self) -> None:
        """Check logs; restart (and record) a process that exited without being killed."""
        for name, incarnation in list(self.current.items()):
            self.check(incarnation)
            code = incarnation.process.poll()
            if code is not None and not incarnation.killed:
                self.figures.crashes.append(f"{name}.{incarnation.number} exited with {code}")
                self.start(name)

    def all_ready(self) -> bool:
        self.poll()
        return all(i.ready is not None for i in self.current.values())

    def stop(self, timeout: float = 60.0) -> None:
        for incarnation in self.current.values():
            incarnation.process.send_signal(signal.SIGTERM)
        for incarnation in self.current.values():
            try:
                code: int | str = incarnation.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                incarnation.process.kill()
                code = "timeout"
            incarnation.read_log()
            if code != 0 or not incarnation.events["stopped"]:
                self.figures.unclean_stops.append(f"{incarnation.name}.{incarnation.number}: {code}")

    def close(self) -> None:
        for incarnation in self.current.values():
            if incarnation.process.poll() is None:
                incarnation.process.kill()
                incarnation.process.wait()

"""Chaos driver: CartPole environments through model workers while workers are SIGKILLed and Redis
is restarted, then the figures that show nothing was lost, nothing done twice, and learning went on.

    python -m tests.faults.chaos --kills 50 --models 2 --envs 8 [--redis-restarts 4] [--json out.json]

What runs:

- a private ``redis-server`` (AOF, ``appendfsync always``) on a free loopback port, unless
  ``--redis-url`` names one (then Redis is not restarted);
- ``--models`` worker processes (``python -m worker model --component-id chaos-<i> --log-json``);
- a load generator in this process: ``--envs`` gymnasium CartPole-v1 environments. Environment *k*
  acts on the logits of model *k mod M* (sampled, as A2C explores), so every model trains on-policy
  on its own environments while it answers (and learns from) all of them;
- a fault loop (seeded): at random moments it SIGKILLs a random worker and starts it again with the
  same COMPONENT_ID, or stops Redis (SIGKILL or SHUTDOWN) and starts it again on the same port and
  directory after a random outage.

What is checked, for every model, once the faults stop and the backlog is answered:

- every published observation got exactly one reply from the model (counted by ``OBS_ID`` as the
  replies stream past: lost = none, duplicates = more than one);
- the counters in the model's committed checkpoint equal what the published input implies
  (:func:`expected_counters`, an independent re-implementation of ``worker/memory.py``'s rules);
- each restarted worker resumed from the checkpoint committed before it: the digests of the policy
  and optimizer state it logs after loading equal the digests of the blobs read from Redis right
  after the kill (``ready`` line, ``policy_sha`` / ``optimizer_sha`` / ``checkpoint_version``);
- no worker exited on its own (a crash), each stopped cleanly on SIGTERM, nothing pending or dead;
- the mean return of the last fifth of the episodes beats the first fifth.

Observations are published with explicit, increasing stream IDs in one MULTI/EXEC per round, so a
transaction that redis-py retries after Redis died just after applying it fails with "ID equal or
smaller" instead of publishing the round twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import redis

from worker.common.connections import connect, ensure_group, free_port
from worker.model.store import ModelStore, digest
from worker.protocol import Encoding, Streams, encode_entry

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ChaosConfig:
    kills: int = 50  # worker SIGKILLs
    redis_restarts: int = 5  # Redis outages (alternately SIGKILL and SHUTDOWN)
    models: int = 2
    envs: int = 8
    seed: int = 0
    min_steps: int = 0  # environment steps to drive at least (more faults come first)
    gap: tuple[float, float] = (1.0, 4.0)  # seconds between two faults
    outage: tuple[float, float] = (0.5, 6.0)  # seconds Redis stays down (redis-py retries for ~3)
    n_steps: int = 5
    learning_rate: float = 7e-4  # the tutorial's; the short form uses more to learn in fewer steps
    batch_size: int = 64
    lease_ttl: float = 1.0
    claim_idle_ms: int = 2000
    abandon: float = 0.002  # chance per step that an environment restarts without REWARD (a drop)
    settle_timeout: float = 180.0  # seconds to wait for the backlog once the faults stop
    redis_url: str | None = None
    prefix: str = "chaos"
    workdir: str | None = None  # worker logs and the Redis directory; a temporary one if None
    verbose: bool = False


@dataclass
class Figures:
    models: int = 0
    envs: int = 0
    kills: int = 0
    killed_before_ready: int = 0
    resumes_verified: int = 0  # restarts whose loaded state matched the checkpoint in Redis
    kills_in_flight: int = 0  # restarts that found entries the killed worker had read, not committed
    incarnations: int = 0  # worker processes started
    resume_mismatches: list[str] = field(default_factory=list)
    redis_restarts: int = 0
    reconnects: int = 0  # reconnections the workers logged
    reconnects_per_model: dict[str, int] = field(default_factory=dict)
    unreachable_per_model: dict[str, int] = field(default_factory=dict)  # failed attempts logged
    generator_retries: int = 0  # load-generator calls that failed and were retried
    crashes: list[str] = field(default_factory=list)  # workers that exited without being killed
    unclean_stops: list[str] = field(default_factory=list)
    observations: int = 0  # published
    steps: int = 0  # environment steps
    replies_expected: int = 0
    replies: int = 0
    lost: int = 0
    duplicates: int = 0
    counters_exact: bool = False
    counter_mismatches: list[str] = field(default_factory=list)
    segments: dict[str, int] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    dead: int = 0
    episodes: int = 0
    return_first_fifth: float = math.nan
    return_last_fifth: float = math.nan
    curve: list[float] = field(
        default_factory=list
    )  # mean return of the episodes ending in each tenth of the steps
    seconds: float = 0.0

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.counters_exact
            and not self.resume_mismatches
            and not self.crashes
            and not self.unclean_stops
            and self.pending == 0
            and self.dead == 0
            and self.improved()
        )

    def improved(self) -> bool:
        return self.return_last_fifth > self.return_first_fifth

    def table(self) -> str:
        rows = [
            ("models x environments", f"{self.models} x {self.envs}"),
            (
                "worker SIGKILLs survived",
                f"{self.kills} ({self.kills_in_flight} with entries in flight, "
                f"{self.killed_before_ready} before ready)",
            ),
            (
                "restarts resumed from the checkpoint",
                f"{self.resumes_verified}, mismatches {len(self.resume_mismatches)}",
            ),
            ("Redis restarts survived", str(self.redis_restarts)),
            ("worker reconnects logged", f"{self.reconnects} {dict(self.reconnects_per_model)}"),
            ("outages ridden out (first failed attempt logged)", str(dict(self.unreachable_per_model))),
            ("load generator retries", str(self.generator_retries)),
            ("worker crashes / unclean stops", f"{len(self.crashes)} / {len(self.unclean_stops)}"),
            ("observations published (env steps)", f"{self.observations} ({self.steps})"),
            ("replies expected / received", f"{self.replies_expected} / {self.replies}"),
            ("entries lost", str(self.lost)),
            ("duplicate replies", str(self.duplicates)),
            ("counters = what the input implies", "yes" if self.counters_exact else "NO"),
            ("segments trained per model", str(self.segments)),
            ("A2C updates per model", str(self.updates)),
            ("transitions dropped (env restarts)", str(self.dropped)),
            ("pending / dead entries at the end", f"{self.pending} / {self.dead}"),
            ("episodes", str(self.episodes)),
            (
                "mean return, first -> last fifth",
                f"{self.return_first_fifth:.1f} -> {self.return_last_fifth:.1f}",
            ),
            ("mean return by tenth of the steps", " ".join(f"{r:.0f}" for r in self.curve)),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def say(config: ChaosConfig, *parts: Any) -> None:
    if config.verbose:
        print(f"[chaos {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Redis


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


# --------------------------------------------------------------------------- workers


@dataclass
class Incarnation:
    """One worker process of a model."""

    model: str
    number: int
    process: subprocess.Popen
    log_path: Path
    expect: dict[str, Any] | None  # the checkpoint in Redis when it started (None: there was none)
    ready: dict[str, Any] | None = None
    events: Counter = field(default_factory=Counter)
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
                continue  # warnings of imported libraries, tracebacks: kept in the log file
            if isinstance(line, dict) and "event" in line:
                self.events[line["event"]] += 1
                if line["event"] == "ready":
                    self.ready = line
                lines.append(line)
        return lines


def spawn(args: list[str], log_path: Path, model: str = "", number: int = 0) -> Incarnation:
    """Start ``args`` (a worker command line) from the repository root, its output in ``log_path``."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    return Incarnation(model, number, process, log_path, None)


def worker_command(
    url: str, model: str, *extra: str, module: str = "worker", prefix: str = "rl"
) -> list[str]:
    """``python -m <module> model`` for ``model`` on ``url``, logging JSON lines."""
    return [
        sys.executable, "-m", module, "model", "--redis-url", url, "--prefix", prefix,
        "--component-id", model, "--log-json", *extra,
    ]  # fmt: skip


class Fleet:
    """The worker processes, one live incarnation per model, and what their logs said."""

    def __init__(
        self, config: ChaosConfig, url: str, client: redis.Redis, logdir: Path, figures: Figures
    ) -> None:
        self.config, self.url, self.logdir, self.figures = config, url, logdir, figures
        self.client, self.streams = client, Streams(config.prefix)
        self.models = [f"chaos-{i}" for i in range(config.models)]
        self.current: dict[str, Incarnation] = {}
        self.history: list[Incarnation] = []

    def command(self, model: str) -> list[str]:
        c = self.config
        return worker_command(
            self.url, model,
            "--seed", str(self.models.index(model)), "--n-steps", str(c.n_steps),
            "--learning-rate", str(c.learning_rate), "--batch-size", str(c.batch_size),
            "--lease-ttl", str(c.lease_ttl), "--heartbeat-interval", "0.3",
            "--claim-idle-ms", str(c.claim_idle_ms), "--stream-maxlen", "100000000",
            prefix=c.prefix,
        )  # fmt: skip

    def start(self, model: str) -> Incarnation:
        """Start a worker for ``model``; no other may be running (the checkpoint is what it must load)."""
        expect = checkpoint_digests(self.client, self.streams, model)
        number = sum(i.model == model for i in self.history)
        incarnation = spawn(self.command(model), self.logdir / f"{model}.{number}.log", model, number)
        incarnation.expect = expect
        self.current[model] = incarnation
        self.history.append(incarnation)
        return incarnation

    def kill(self, model: str) -> Incarnation:
        incarnation = self.current[model]
        incarnation.killed = True
        incarnation.process.send_signal(signal.SIGKILL)
        incarnation.process.wait()
        self.check(incarnation)
        return incarnation

    def check(self, incarnation: Incarnation) -> None:
        """Read new log lines; once ready, compare the loaded state with the expected checkpoint."""
        had_ready = incarnation.ready is not None
        incarnation.read_log()
        if incarnation.ready is None or had_ready:
            return
        ready, expect = incarnation.ready, incarnation.expect
        name = f"{incarnation.model}.{incarnation.number}"
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
        """Check logs; restart (and record) a worker that exited without being killed."""
        for model, incarnation in list(self.current.items()):
            self.check(incarnation)
            code = incarnation.process.poll()
            if code is not None and not incarnation.killed:
                self.figures.crashes.append(f"{model}.{incarnation.number} exited with {code}")
                self.start(model)

    def all_ready(self) -> bool:
        self.poll()
        return all(i.ready is not None for i in self.current.values())

    def stop(self, timeout: float = 60.0) -> None:
        for incarnation in self.current.values():
            incarnation.process.send_signal(signal.SIGTERM)
        for incarnation in self.current.values():
            try:
                code = incarnation.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                incarnation.process.kill()
                code = "timeout"
            incarnation.read_log()
            if code != 0 or not incarnation.events["stopped"]:
                self.figures.unclean_stops.append(f"{incarnation.model}.{incarnation.number}: {code}")

    def close(self) -> None:
        for incarnation in self.current.values():
            if incarnation.process.poll() is None:
                incarnation.process.kill()
                incarnation.process.wait()


def checkpoint_digests(client: redis.Redis, streams: Streams, model: str) -> dict[str, Any] | None:
    """What a worker that loads ``model`` now must report: version and digests of the blobs."""
    checkpoint = client.hgetall(streams.model_key(model, "checkpoint"))
    if b"policy" not in checkpoint:
        return None
    return {
        "checkpoint_version": msgpack.unpackb(checkpoint[b"meta"])["version"],
        "policy_sha": digest(checkpoint[b"policy"]),
        "optimizer_sha": digest(checkpoint[b"optimizer"]),
    }


# --------------------------------------------------------------------------- load generator


@dataclass
class Published:
    entry_id: str
    env: int
    has_reward: bool


class Load:
    """CartPole environments stepped on the models' logits; counts every reply by (model, OBS_ID)."""

    def __init__(self, config: ChaosConfig, client: redis.Redis, models: list[str]) -> None:
        self.config, self.client, self.models = config, client, models
        self.streams = Streams(config.prefix)
        self.rng = np.random.default_rng(config.seed)
        self.envs = [gym.make("CartPole-v1") for _ in range(config.envs)]
        self.actor = [models[k % len(models)] for k in range(config.envs)]
        self.returns = [0.0] * config.envs
        self.episodes: list[float] = []
        self.episode_ends: list[int] = []  # environment steps when each episode ended
        self.published: list[Published] = []
        self.outstanding: dict[str, int] = {}  # observation ID -> environment awaiting its actor's logits
        self.ready: list[tuple[int, dict[str, Any]]] = []  # messages to publish
        self.replies: Counter[tuple[str, str]] = Counter()
        self.answered = 0  # distinct (model, observation) pairs replied to
        self.cursor = "0-0"
        self.last_id = (0, 0)
        self.steps = 0
        self.retries = 0
        self.publishing = True

    def begin(self) -> None:
        for k, env in enumerate(self.envs):
            obs, _ = env.reset(seed=self.config.seed * 1000 + k)
            self.ready.append((k, {"OBSERVATION": obs.tolist(), "ENV_ID": f"env-{k}"}))
        self.publish()

    def _next_id(self) -> str:
        ms, seq = self.last_id
        now = int(time.time() * 1000)
        self.last_id = (now, 0) if now > ms else (ms, seq + 1)
        return f"{self.last_id[0]}-{self.last_id[1]}"

    def publish(self) -> None:
        """One MULTI/EXEC per round, so each round reaches the models as one batch."""
        if not self.ready or not self.publishing:
            return
        batch = [(self._next_id(), k, message) for k, message in self.ready]
        while True:
            try:
                with self.client.pipeline(transaction=True) as pipe:
                    for entry_id, _, message in batch:
                        pipe.xadd(
                            self.streams.observation, encode_entry(message, Encoding.MSGPACK), id=entry_id
                        )
                    pipe.execute()
                break
            except redis.ResponseError as exc:
                # redis-py re-ran a transaction that Redis had applied before it went down.
                if "equal or smaller" not in str(exc) or not self._applied(batch):
                    raise
                break
            except (redis.ConnectionError, redis.TimeoutError):
                self.retries += 1
                time.sleep(0.2)
        for entry_id, k, message in batch:
            self.published.append(Published(entry_id, k, "REWARD" in message))
            self.outstanding[entry_id] = k
        self.ready = []

    def _applied(self, batch: list[tuple[str, int, dict]]) -> bool:
        found = self.client.xrange(self.streams.observation, batch[0][0], batch[-1][0])
        return [i.decode() for i, _ in found] == [entry_id for entry_id, _, _ in batch]

    def pump(self, block_ms: int = 50) -> None:
        """Read the replies that arrived, act on the actors' ones, publish the next round."""
        try:
            reply = self.client.xread({self.streams.logits: self.cursor}, count=5000, block=block_ms)
        except (redis.ConnectionError, redis.TimeoutError):
            self.retries += 1
            time.sleep(0.2)
            return
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.cursor = entry_id.decode()
                message = msgpack.unpackb(fields[b"data"], raw=False)
                model, obs_id = message["COMPONENT_ID"], message["OBS_ID"]
                self.replies[(model, obs_id)] += 1
                self.answered += self.replies[(model, obs_id)] == 1
                k = self.outstanding.get(obs_id)
                if k is not None and model == self.actor[k]:
                    del self.outstanding[obs_id]
                    self._act(k, message["LOGITS"])
        self.publish()

    def _act(self, k: int, logits: list[float]) -> None:
        if not self.publishing:
            return
        z = np.asarray(logits, dtype=np.float64)
        p = np.exp(z - z.max())
        action = int(self.rng.choice(len(p), p=p / p.sum()))
        obs, reward, terminated, truncated, _ = self.envs[k].step(action)
        self.steps += 1
        self.returns[k] += float(reward)
        message: dict[str, Any] = {"ENV_ID": f"env-{k}", "REWARD": float(reward), "ACTION": action}
        if terminated or truncated:
            self.episodes.append(self.returns[k])
            self.episode_ends.append(self.steps)
            self.returns[k] = 0.0
            message["DONE"] = True
            if truncated and not terminated:
                message |= {"TRUNCATED": True, "TERMINAL_OBSERVATION": obs.tolist()}
            obs, _ = self.envs[k].reset()
        elif self.rng.random() < self.config.abandon:
            # The environment is restarted without reporting the step: the model drops its rollout.
            obs, _ = self.envs[k].reset()
            self.returns[k] = 0.0
            message = {"ENV_ID": f"env-{k}"}
        message["OBSERVATION"] = obs.tolist()
        self.ready.append((k, message))

    def missing(self) -> int:
        """Replies still to come: published observations times models, minus those answered."""
        return len(self.published) * len(self.models) - self.answered


def expected_counters(published: list[Published], n_envs: int, n_steps: int) -> dict[str, int]:
    """The counters a model that read every one of ``published`` must have committed.

    Per environment, as ``worker/memory.py`` (no DETERMINISTIC steps here): an observation with
    REWARD after a known one completes a transition, every ``n_steps`` transitions a segment; one
    without REWARD after known ones drops the unfinished rollout. Nothing is paused, so every
    segment is trained on (none discarded).
    """
    known, rollout = [False] * n_envs, [0] * n_envs
    counts = Counter()
    for p in published:
        counts["observations"] += 1
        if p.has_reward and known[p.env]:
            counts["transitions"] += 1
            rollout[p.env] += 1
            if rollout[p.env] == n_steps:
                counts["segments"] += 1
                rollout[p.env] = 0
        elif rollout[p.env]:
            counts["dropped"] += rollout[p.env]
            rollout[p.env] = 0
        known[p.env] = True
    return {
        key: counts[key]
        for key in ("observations", "transitions", "dropped", "segments", "discarded", "dead", "commands")
    }


# --------------------------------------------------------------------------- the run


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


def _wait(condition, timeout: float, what: str, tick=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        if tick is not None:
            tick()
        else:
            time.sleep(0.05)


def run(config: ChaosConfig) -> Figures:
    """Drive the load through the faults; return the figures (check :meth:`Figures.ok`)."""
    began = time.monotonic()
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="rl-chaos-"))
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    figures = Figures(models=config.models, envs=config.envs)
    rng = np.random.default_rng(config.seed + 1)
    with _redis(config, workdir) as server:
        url = config.redis_url or server.url  # type: ignore[union-attr]
        client = connect(url)
        streams = Streams(config.prefix)
        if client.exists(streams.observation):
            raise SystemExit(f"{streams.observation} exists on {url}: use a fresh --prefix")
        fleet = Fleet(config, url, client, logdir, figures)
        for model in fleet.models:  # every model must see every observation: groups first
            for stream in (streams.observation, streams.evolution):
                ensure_group(client, stream, Streams.group(model))
        try:
            for model in fleet.models:
                fleet.start(model)
            _wait(fleet.all_ready, 180, "the workers to start")
            say(config, f"{config.models} workers ready; logs in {logdir}")
            load = Load(config, client, fleet.models)
            load.begin()
            faults = ["kill"] * config.kills + (["redis"] * config.redis_restarts if server else [])
            rng.shuffle(faults)
            next_fault = time.monotonic() + rng.uniform(*config.gap)
            while faults or load.steps < config.min_steps:
                load.pump()
                fleet.poll()
                if faults and time.monotonic() >= next_fault:
                    fault = faults.pop()
                    if fault == "kill":
                        _kill_one(config, fleet, rng, figures)
                    else:
                        _restart_redis(config, server, rng, figures)  # type: ignore[arg-type]
                    next_fault = time.monotonic() + rng.uniform(*config.gap)
            say(config, f"faults done after {load.steps} steps; draining the backlog")
            load.publishing = False
            load.ready = []
            _wait(lambda: load.missing() == 0, config.settle_timeout, "every reply", tick=load.pump)
            _wait(fleet.all_ready, 60, "the last restarts to report")
            fleet.stop()
        finally:
            fleet.close()
        _collect(config, client, streams, fleet, load, figures)
        client.close()
    figures.seconds = time.monotonic() - began
    if not config.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def _kill_one(config: ChaosConfig, fleet: Fleet, rng: np.random.Generator, figures: Figures) -> None:
    """SIGKILL a random worker (most often one that is serving) and start it again."""
    serving = [m for m, i in fleet.current.items() if i.ready is not None]
    model = str(rng.choice(serving if serving and rng.random() < 0.85 else fleet.models))
    incarnation = fleet.kill(model)
    figures.kills += 1
    figures.killed_before_ready += incarnation.ready is None
    restarted = fleet.start(model)
    say(config, f"kill {figures.kills}: {model}.{incarnation.number}, checkpoint {restarted.expect}")


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


def _collect(
    config: ChaosConfig, client: redis.Redis, streams: Streams, fleet: Fleet, load: Load, figures: Figures
) -> None:
    figures.observations = len(load.published)
    figures.steps = load.steps
    figures.generator_retries = load.retries
    figures.replies_expected = len(load.published) * len(fleet.models)
    figures.replies = sum(load.replies.values())
    for model in fleet.models:
        counts = [load.replies[(model, p.entry_id)] for p in load.published]
        figures.lost += sum(c == 0 for c in counts)
        figures.duplicates += sum(c - 1 for c in counts if c > 1)
    expected = expected_counters(load.published, config.envs, config.n_steps)
    for model in fleet.models:
        counters = asdict(ModelStore(client, streams, model).load().counters)
        found = {key: counters[key] for key in expected}
        if found != expected:
            figures.counter_mismatches.append(f"{model}: {found} != {expected}")
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
        figures.updates[model] = counters["updates"]
        figures.dropped[model] = counters["dropped"]
        for stream in (streams.observation, streams.evolution):
            figures.pending += client.xpending(stream, Streams.group(model))["pending"]
    figures.counters_exact = not figures.counter_mismatches
    figures.dead = client.xlen(streams.dead)
    figures.incarnations = len(fleet.history)
    for incarnation in fleet.history:
        model, n = incarnation.model, incarnation.events["reconnected"]
        figures.reconnects += n
        figures.reconnects_per_model[model] = figures.reconnects_per_model.get(model, 0) + n
        failed = incarnation.events["redis unavailable, retrying"]
        figures.unreachable_per_model[model] = figures.unreachable_per_model.get(model, 0) + failed
    episodes = load.episodes
    figures.episodes = len(episodes)
    if len(episodes) >= 5:
        fifth = len(episodes) // 5
        figures.return_first_fifth = float(np.mean(episodes[:fifth]))
        figures.return_last_fifth = float(np.mean(episodes[-fifth:]))
        tenth = np.minimum(np.asarray(load.episode_ends) * 10 // max(load.steps, 1), 9)
        figures.curve = [
            float(np.mean(np.asarray(episodes)[tenth == i])) for i in range(10) if (tenth == i).any()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.chaos", description=__doc__.split("\n\n")[0]
    )
    defaults = ChaosConfig()
    parser.add_argument("--kills", type=int, default=defaults.kills, help="worker SIGKILLs")
    parser.add_argument("--redis-restarts", type=int, default=defaults.redis_restarts)
    parser.add_argument("--models", type=int, default=defaults.models)
    parser.add_argument("--envs", type=int, default=defaults.envs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--min-steps", type=int, default=defaults.min_steps, help="env steps to drive at least"
    )
    parser.add_argument("--gap", type=float, nargs=2, default=defaults.gap, help="seconds between faults")
    parser.add_argument(
        "--outage", type=float, nargs=2, default=defaults.outage, help="seconds Redis is down"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--redis-url", default=None, help="use this Redis (not restarted) instead of a private one"
    )
    parser.add_argument("--prefix", default=defaults.prefix)
    parser.add_argument("--workdir", default=None, help="keep worker logs and the AOF here")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        kills=args.kills, redis_restarts=args.redis_restarts, models=args.models, envs=args.envs,
        seed=args.seed, min_steps=args.min_steps, gap=tuple(args.gap), outage=tuple(args.outage),
        learning_rate=args.learning_rate, batch_size=args.batch_size, redis_url=args.redis_url,
        prefix=args.prefix, workdir=args.workdir, verbose=not args.quiet,
    )  # fmt: skip
    figures = run(config)
    print(figures.table())
    if figures.resume_mismatches or figures.counter_mismatches or figures.crashes or figures.unclean_stops:
        print(json.dumps({k: getattr(figures, k) for k in (
            "resume_mismatches", "counter_mismatches", "crashes", "unclean_stops")}, indent=2))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(figures), indent=2))
    print("OK" if figures.ok() else "FAILED")
    return 0 if figures.ok() else 1


if __name__ == "__main__":
    sys.exit(main())

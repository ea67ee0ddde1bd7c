"""The rounds of the loop, as ``control train`` runs them: a training RUN, an evaluation RUN, then
one generation of ``python -m worker evolution`` as a process. The fault loop owes it evolution
kills; each is done to one evolution process mid-generation (after its GET, after its SET, or at a
random moment), and a killed evolution is started again, as a supervisor would: it must finish the
generation, not begin another."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from tests.faults.chaos.config import ChaosConfig, Figures, say
from tests.faults.chaos.processes import Incarnation, component_command, spawn
from worker.common.connections import connect
from worker.common.serve import is_outage
from worker.control.train import run_episodes
from worker.evolution.generation import generation_key
from worker.protocol import Streams

# What `python -m worker evolution` prints when a generation cannot take place (EvolutionError):
# starting it again would not help. Any other failure is Redis being away, and it is started again.
GIVE_UP = ("no live models", "none of the live models")
ATTEMPTS = 20  # evolution processes per generation before it counts as failed


class Rounds(threading.Thread):
    """Rounds until :attr:`finish` is set; what they did goes into ``figures``."""

    def __init__(self, config: ChaosConfig, url: str, logdir: Path, figures: Figures) -> None:
        super().__init__(daemon=True, name="rounds")
        self.config, self.url, self.logdir, self.figures = config, url, logdir, figures
        self.client = connect(url)
        self.streams = Streams(config.prefix)
        self.rng = np.random.default_rng(config.seed + 2)
        self.finish = threading.Event()  # after the round in hand
        self._halt = threading.Event()  # at once: no new evolution process
        self.phase = "starting"  # training, evaluating, evolving, done: read by the fault loop
        self.evolutions: list[Incarnation] = []
        self.error: BaseException | None = None
        self._owed = 0  # evolution kills still to do
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- for the fault loop

    def owe_kill(self) -> None:
        with self._lock:
            self._owed += 1

    @property
    def owed(self) -> int:
        with self._lock:
            return self._owed

    # ----------------------------------------------------------------- the rounds

    def run(self) -> None:
        try:
            while not self.finish.is_set():
                self.figures.rounds += 1
                self.phase = "training"
                trained = self._run(steps=self.config.round_steps)
                self.phase = "evaluating"
                evaluated = self._run(episodes=self.config.eval_episodes, deterministic=True)
                self.figures.steps += trained["steps"] if trained else 0
                if evaluated:
                    self.figures.eval_returns.append(evaluated["mean_return"])
                returns = [f"{r['mean_return']:.1f}" if r else "failed" for r in (trained, evaluated)]
                say(
                    self.config, f"round {self.figures.rounds}: {self.figures.steps} steps, returns {returns}"
                )
                if self.finish.is_set():
                    break
                self.phase = "evolving"
                self._generation()
        except BaseException as exc:  # surfaced by the fault loop
            self.error = exc
        finally:
            self.phase = "done"

    def _patient(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, retried while Redis is away."""
        while True:
            try:
                return call(*args)
            except redis.RedisError as exc:
                if not is_outage(exc):
                    raise
                self.figures.driver_retries += 1
                time.sleep(0.2)

    def _run(self, **target: Any) -> dict[str, Any] | None:
        """One RUN through ``run_episodes``; ``None`` (recorded) if it failed or stalled."""
        self.figures.runs += 1
        try:
            return self._patient(
                lambda: run_episodes(self.client, self.streams, timeout=self.config.run_timeout, **target)
            )
        except RuntimeError as exc:  # an ERROR report, or no report in time: the loop did not go on
            self.figures.run_failures.append(str(exc))
            say(self.config, f"run failed: {exc}")
            return None

    # ----------------------------------------------------------------- one generation

    def _generation(self) -> None:
        """Evolution processes until one finishes the generation (a killed one is started again)."""
        for _ in range(ATTEMPTS):
            if self._halt.is_set():
                return
            incarnation = self._spawn()
            self._watch(incarnation, self._plan())
            incarnation.read_log()
            for line in incarnation.lines:
                if line["event"] == "resuming generation":
                    when = "after its SET" if line.get("set_sent") else "after its GET"
                    self.figures.takeovers[when] = self.figures.takeovers.get(when, 0) + 1
            if incarnation.killed:
                continue
            done = [line for line in incarnation.lines if line["event"] == "generation"]
            if done:
                self.figures.generations += 1
                self.figures.generations_resumed += bool(done[-1].get("resumed"))
                self.figures.acks_late += incarnation.events["SET not acknowledged within the timeout"]
                return
            output = incarnation.log_path.read_text(errors="replace")
            if any(reason in output for reason in GIVE_UP):
                self.figures.generations_failed.append(output.strip().splitlines()[-1])
                return
            time.sleep(0.5)  # Redis was away: the next process finishes the generation
        self.figures.generations_failed.append(f"no generation after {ATTEMPTS} evolution processes")

    def _spawn(self) -> Incarnation:
        c = self.config
        command = component_command(
            self.url, "evolution", "--seed", str(c.seed), "--timeout", str(c.evolution_wait),
            "--evolution-timeout", str(c.evolution_timeout), "--registry-max-age", "2",
            "--fitness-episodes", "2", "--stream-maxlen", "100000", prefix=c.prefix,
        )  # fmt: skip
        number = len(self.evolutions)
        incarnation = spawn(command, self.logdir / f"evolution.{number}.log", "evolution", number)
        self.evolutions.append(incarnation)
        self.figures.evolution_processes += 1
        return incarnation

    def _plan(self) -> tuple[str, float] | None:
        """When to kill the next evolution process, if a kill is owed: ``(phase, delay)``."""
        if not self.owed:
            return None
        phase = str(self.rng.choice(["any", "get", "set"], p=[0.2, 0.5, 0.3]))
        delay = float(self.rng.uniform(0.0, {"any": 4.0, "get": 2.0, "set": 0.0}[phase]))
        return phase, delay

    def _watch(self, incarnation: Incarnation, plan: tuple[str, float] | None) -> None:
        """Wait for the process to exit, killing it as planned: ``any``, ``delay`` seconds after it
        started; ``get`` (``set``), ``delay`` seconds after its GET (SET) is recorded, by this
        process or, for a generation it took over, once it said so. A process that exits first
        leaves the kill to the next one."""
        key, started, due = generation_key(self.streams), time.monotonic(), None
        held = set(self._patient(self.client.hkeys, key)) if plan else set()  # before this process
        while incarnation.process.poll() is None:
            if plan is None:
                time.sleep(0.05)
                continue
            phase, delay = plan
            if due is None and phase == "any":
                due = started + delay
            elif due is None and self._patient(self.client.hexists, key, f".{phase}_id"):
                incarnation.read_log()
                if f".{phase}_id".encode() not in held or incarnation.events["resuming generation"]:
                    due = time.monotonic() + delay
            if due is not None and time.monotonic() >= due:
                incarnation.kill()
                self._record_kill(self._patient(self.client.hgetall, key))
                return
            time.sleep(0.003 if phase == "set" else 0.02)

    def _record_kill(self, state: dict[bytes, bytes]) -> None:
        if b".set_id" in state:
            phase = "after its SET"
        elif b".get_id" in state:
            phase = "after its GET"
        else:
            phase = "outside a generation"
        phases = self.figures.evolution_kill_phases
        phases[phase] = phases.get(phase, 0) + 1
        self.figures.evolution_kills += 1
        with self._lock:
            self._owed -= 1
        say(self.config, f"evolution kill {self.figures.evolution_kills}: {phase}")

    def close(self) -> None:
        """Stop and kill what is left (after an error)."""
        self.finish.set()
        self._halt.set()
        for incarnation in self.evolutions:
            if incarnation.process.poll() is None:
                incarnation.kill()

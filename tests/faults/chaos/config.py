"""What a chaos run does (:class:`ChaosConfig`) and what it found (:class:`Figures`, the table)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChaosConfig:
    kills: int = 50  # model worker SIGKILLs
    redis_restarts: int = 5  # Redis outages (alternately SIGKILL and SHUTDOWN)
    aggregator_kills: int = 10
    runner_kills: int = 10
    evolution_kills: int = 10  # each mid-generation: after the GET, after the SET, or at random
    models: int = 2
    envs: int = 8
    seed: int = 0
    min_steps: int = 0  # training environment steps to drive at least (more faults come first)
    gap: tuple[float, float] = (1.0, 4.0)  # seconds between two faults
    outage: tuple[float, float] = (0.5, 6.0)  # seconds Redis stays down (redis-py retries for ~3)
    round_steps: int = 2000  # training steps per round
    eval_episodes: int = 8  # deterministic episodes per round
    n_steps: int = 5
    learning_rate: float = 7e-4  # the tutorial's; the short form uses more to learn in fewer steps
    batch_size: int = 64
    lease_ttl: float = 1.0
    claim_idle_ms: int = 2000
    evolution_timeout: float = 30.0  # the models' pause after a GET; evolution's too
    evolution_wait: float = 10.0  # evolution's --timeout (for the weights, and for the acks)
    run_timeout: float = 300.0  # a RUN whose report takes longer counts as a stall
    settle_timeout: float = 180.0  # seconds to wait for the backlog once the faults stop
    redis_url: str | None = None
    prefix: str = "chaos"
    workdir: str | None = None  # logs and the Redis directory; a temporary one if None
    verbose: bool = False


@dataclass
class Figures:
    models: int = 0
    envs: int = 0
    # model workers
    kills: int = 0
    killed_before_ready: int = 0
    resumes_verified: int = 0  # restarts whose loaded state matched the checkpoint in Redis
    kills_in_flight: int = 0  # restarts that found entries the killed worker had read, not committed
    incarnations: int = 0  # model worker processes started
    resume_mismatches: list[str] = field(default_factory=list)
    # the other components
    aggregator_kills: int = 0
    aggregator_rebuilt: int = 0  # undecided observations its restarts rebuilt from pending replies
    runner_kills: int = 0
    runner_kills_mid_run: int = 0  # killed while a RUN was being executed
    runner_restarts_ready: int = 0  # restarts that came up (others were killed first)
    runner_resumed: int = 0  # restarts that read on after the last command finished
    runs_rerun: int = 0  # RUNs started again by a restarted runner
    evolution_kills: int = 0
    evolution_kill_phases: dict[str, int] = field(default_factory=dict)
    evolution_processes: int = 0
    generations: int = 0  # finished
    generations_resumed: int = 0  # finished by an evolution after the one that began them
    takeovers: dict[str, int] = field(default_factory=dict)  # evolutions that found one unfinished
    generations_failed: list[str] = field(default_factory=list)
    gets: int = 0
    sets: int = 0
    sets_not_one_per_get: int = 0  # a GET followed by no SET or by two
    acks_late: int = 0  # generations whose SET some model acknowledged after the evolution's timeout
    pauses_left_to_timeout: int = 0  # GET replies of models its SET did not name
    paused_at_end: list[str] = field(default_factory=list)
    # Redis
    redis_restarts: int = 0
    reconnects: int = 0  # reconnections the model workers logged
    reconnects_per_model: dict[str, int] = field(default_factory=dict)
    unreachable_per_model: dict[str, int] = field(default_factory=dict)  # failed attempts logged
    driver_retries: int = 0  # calls of the rounds driver retried through an outage
    crashes: list[str] = field(default_factory=list)  # processes that exited without being killed
    unclean_stops: list[str] = field(default_factory=list)
    # the rounds
    rounds: int = 0
    runs: int = 0  # RUNs sent
    run_failures: list[str] = field(default_factory=list)  # ERROR reports, or no report in time
    steps: int = 0  # training environment steps, as the run reports count them
    # observations and their answers
    observations: int = 0
    actions: int = 0
    actions_missing: int = 0  # observations without an action
    actions_duplicate: int = 0  # actions beyond the first for one observation
    actions_partial: int = 0  # decided without every model's logits (one down, or past the deadline)
    replies_expected: int = 0
    replies: int = 0
    lost: int = 0
    duplicates: int = 0
    counters_exact: bool = False
    counter_mismatches: list[str] = field(default_factory=list)
    segments: dict[str, int] = field(default_factory=dict)
    discarded: dict[str, int] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    dead: int = 0
    # learning
    episodes: int = 0
    return_first_fifth: float = math.nan
    return_last_fifth: float = math.nan
    curve: list[float] = field(default_factory=list)  # mean return of the episodes in each tenth
    eval_returns: list[float] = field(default_factory=list)  # per round
    seconds: float = 0.0

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.actions_missing == 0
            and self.actions_duplicate == 0
            and self.counters_exact
            and not self.resume_mismatches
            and not self.crashes
            and not self.unclean_stops
            and not self.run_failures
            and not self.generations_failed
            and self.sets_not_one_per_get == 0
            and not self.paused_at_end
            and self.pending == 0
            and self.dead == 0
            and self.improved()
        )

    def improved(self) -> bool:
        return self.return_last_fifth > self.return_first_fifth

    def table(self) -> str:
        phases = ", ".join(f"{n} {phase}" for phase, n in sorted(self.evolution_kill_phases.items()))
        eval_fifth = max(1, len(self.eval_returns) // 5)
        evals = self.eval_returns
        rows = [
            ("models x environments", f"{self.models} x {self.envs}"),
            (
                "model worker SIGKILLs survived",
                f"{self.kills} ({self.kills_in_flight} with entries in flight, "
                f"{self.killed_before_ready} before ready)",
            ),
            (
                "restarts resumed from the checkpoint",
                f"{self.resumes_verified}, mismatches {len(self.resume_mismatches)}",
            ),
            (
                "aggregator SIGKILLs survived",
                f"{self.aggregator_kills} ({self.aggregator_rebuilt} undecided observations rebuilt)",
            ),
            (
                "runner SIGKILLs survived",
                f"{self.runner_kills} ({self.runner_kills_mid_run} mid-run; {self.runner_resumed} of"
                f" {self.runner_restarts_ready} restarts resumed, {self.runs_rerun} RUNs run again)",
            ),
            ("evolution SIGKILLs survived", f"{self.evolution_kills} ({phases or 'none'})"),
            (
                "generations (resumed) / processes",
                f"{self.generations} ({self.generations_resumed}) / {self.evolution_processes},"
                f" failed {len(self.generations_failed)}",
            ),
            (
                "evolutions that took a generation over",
                " ".join(f"{n} {when}," for when, n in sorted(self.takeovers.items())).rstrip(",") or "none",
            ),
            (
                "GETs / SETs (not one SET per GET)",
                f"{self.gets} / {self.sets} ({self.sets_not_one_per_get})",
            ),
            (
                "paused: left to the timeout / at the end",
                f"{self.pauses_left_to_timeout} / {len(self.paused_at_end)}"
                f" (SETs acknowledged late: {self.acks_late})",
            ),
            ("Redis restarts survived", str(self.redis_restarts)),
            ("model reconnects logged", f"{self.reconnects} {dict(self.reconnects_per_model)}"),
            ("outages ridden out (first failed attempt logged)", str(dict(self.unreachable_per_model))),
            ("driver calls retried through an outage", str(self.driver_retries)),
            ("crashes / unclean stops", f"{len(self.crashes)} / {len(self.unclean_stops)}"),
            (
                "rounds / RUNs (failed)",
                f"{self.rounds} / {self.runs} ({len(self.run_failures)})",
            ),
            ("observations (training steps)", f"{self.observations} ({self.steps})"),
            (
                "actions (missing / duplicate / not from every model)",
                f"{self.actions} ({self.actions_missing} / {self.actions_duplicate}"
                f" / {self.actions_partial})",
            ),
            ("model replies expected / received", f"{self.replies_expected} / {self.replies}"),
            ("replies lost / duplicate", f"{self.lost} / {self.duplicates}"),
            ("counters = what the input implies", "yes" if self.counters_exact else "NO"),
            ("segments trained / discarded (paused)", f"{self.segments} / {self.discarded}"),
            ("A2C updates per model", str(self.updates)),
            ("transitions dropped (env restarts)", str(self.dropped)),
            ("evolution commands per model", str(self.commands)),
            ("pending / dead entries at the end", f"{self.pending} / {self.dead}"),
            ("training episodes", str(self.episodes)),
            (
                "mean return, first -> last fifth",
                f"{self.return_first_fifth:.1f} -> {self.return_last_fifth:.1f}",
            ),
            ("mean return by tenth of the episodes", " ".join(f"{r:.0f}" for r in self.curve)),
            (
                "eval return, first -> last fifth of rounds",
                f"{_mean(evals[:eval_fifth]):.1f} -> {_mean(evals[-eval_fifth:]):.1f}",
            ),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def say(config: ChaosConfig, *parts: Any) -> None:
    if config.verbose:
        print(f"[chaos {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)

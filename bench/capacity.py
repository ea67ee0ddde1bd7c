"""What one environment step costs Redis: commands, bytes and CPU, per step and per model.

Run as ``python -m bench.cluster --capacity [--models 1 2 8] [--seconds 20] [--warmup 5] [--n-envs 8]``.
For each N of ``--models``, one swarm (:func:`bench.cluster.swarms`: N ``python -m worker model``
processes, the aggregator combining them, one environment runner with ``--n-envs`` CartPole-v1
environments acting through it) runs on a fresh private ``redis-server``:

1. while the swarm is ready but has no RUN yet, Redis's CPU over 3 s: what a waiting swarm costs
   (heartbeats, blocking reads that time out);
2. the swarm steps; after ``--warmup`` seconds, ``CONFIG RESETSTAT`` opens a window of ``--seconds``;
3. at its end Redis reports what it did in the window: ``INFO commandstats`` (calls per
   command), ``INFO stats`` (``total_net_input_bytes``, ``total_net_output_bytes``) and ``INFO cpu``
   (``used_cpu_user + used_cpu_sys`` of the process, and of its main thread), divided by the
   environment steps of the window (the entries added to ``<prefix>:observation``, one per step).
   Beside them, from ``/proc``: the CPU of the swarm's processes per step, and what the rest of
   the machine used (other work on a shared machine).

Redis runs every command on its main thread, so one node carries at most 1 / (Redis CPU seconds per
step) environment steps per second; the last column prints it. The bench fits each per-step figure
as ``fixed + per_model * N``: the fixed part is the runner's and the aggregator's traffic, the
per-model part each model's reads, replies and commits. docs/scaling.md builds on these figures.

Counted as Redis counts them: a command run by a script (``EVALSHA``) or inside ``MULTI``/``EXEC`` is
counted under its own name as well as the script or the ``EXEC``. The bench's own ``INFO``,
``CONFIG RESETSTAT`` and two ``XINFO STREAM`` are left out (their few hundred bytes are not). The
figures are per step at this round size: a round of the lockstep runner publishes ``--n-envs``
observations at once, and many commands are per round, not per step (compare ``--n-envs 64``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import redis

from bench.cluster import cpu_seconds, go, machine_busy, steps_so_far, swarms, warm_up
from worker.common.servers import embedded_redis
from worker.protocol import Streams

OWN_COMMANDS = ("info", "config|resetstat")  # what the bench itself sends inside its window
IDLE_SECONDS = 3.0  # how long Redis is watched while the swarm waits, before its RUN


@dataclass
class Cost:
    """What Redis spent on one swarm of ``models`` models over a window of ``steps`` steps."""

    models: int
    steps: int
    seconds: float
    calls: dict[str, int]  # by command, as INFO commandstats names them
    net_in: int
    net_out: int
    cpu: float  # redis-server's CPU seconds, all threads
    cpu_main: float  # of its main thread, the one that runs commands
    idle: float  # fraction of a core Redis used while the swarm waited (no RUN yet)
    python: float  # CPU seconds of the swarm's processes (models, aggregator, runner)
    others: float  # CPU seconds of everything else on the machine (a shared machine's noise)

    @property
    def commands(self) -> int:
        return sum(self.calls.values())

    @property
    def net(self) -> int:
        return self.net_in + self.net_out

    def per_step(self, total: float) -> float:
        return total / self.steps


def redis_cpu(info: dict) -> tuple[float, float]:
    """Redis's CPU seconds so far: all threads, and its main thread."""
    total = info["used_cpu_user"] + info["used_cpu_sys"]
    return total, info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"]


def measure_cost(models: int, args: argparse.Namespace) -> Cost:
    """One swarm of ``models`` models on a fresh redis-server: Redis's costs over the window."""
    streams = Streams("{a}")
    print(f"capacity: {models} model(s)", file=sys.stderr)
    with (
        embedded_redis() as url,
        redis.Redis.from_url(url) as server,
        swarms(url, ["{a}"], False, models, args.n_envs) as loop,
    ):
        # Before any step: what the swarm costs Redis while it waits (heartbeats, reads timing
        # out). A fixed cost per swarm, not per step; the per-step figures include it (conservative).
        cpu0, _ = redis_cpu(server.info("cpu"))
        time.sleep(IDLE_SECONDS)
        idle = (redis_cpu(server.info("cpu"))[0] - cpu0) / IDLE_SECONDS
        go(loop)
        warm_up(loop, args.warmup)
        server.config_resetstat()
        cpu0, main0 = redis_cpu(server.info("cpu"))
        steps0, t0 = steps_so_far(server, streams), time.perf_counter()
        python0, machine0 = sum(map(cpu_seconds, loop.pids.values())), machine_busy()
        time.sleep(args.seconds)
        python1, machine1 = sum(map(cpu_seconds, loop.pids.values())), machine_busy()
        steps1, t1 = steps_so_far(server, streams), time.perf_counter()
        info = server.info("all")
        loop.check()
    cpu1, main1 = redis_cpu(info)
    stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
    stats = {k: v for k, v in stats.items() if k not in OWN_COMMANDS}
    stats["xinfo|stream"]["calls"] -= 2  # the bench's own, at the window's start and end
    return Cost(
        models=models,
        steps=steps1 - steps0,
        seconds=t1 - t0,
        calls={k: v["calls"] for k, v in stats.items() if v["calls"]},
        net_in=info["total_net_input_bytes"],
        net_out=info["total_net_output_bytes"],
        cpu=cpu1 - cpu0,
        cpu_main=main1 - main0,
        idle=idle,
        python=python1 - python0,
        others=(machine1 - machine0) - (python1 - python0) - (cpu1 - cpu0),
    )


def fit(costs: list[Cost], value: str) -> tuple[float, float]:
    """``value`` per step as ``fixed + per_model * models``, least squares over the runs."""
    if len({c.models for c in costs}) < 2:
        return float("nan"), float("nan")
    per_model, fixed = np.polyfit(
        [c.models for c in costs], [c.per_step(getattr(c, value)) for c in costs], 1
    )
    return float(fixed), float(per_model)


def report_costs(costs: list[Cost], n_envs: int) -> None:
    us = 1e6
    print(f"\n## What one environment step costs Redis ({n_envs} environments, one redis-server)\n")
    header = (
        "| models | window s | steps | steps/s | commands/step | per model | bytes in/step | bytes out/step"
    )
    print(header + " | bytes/step per model |")
    print("|" + "---:|" * 9)
    for c in costs:
        commands, net = c.per_step(c.commands), c.per_step(c.net)
        print(
            f"| {c.models} | {c.seconds:.1f} | {c.steps:,} | {c.steps / c.seconds:,.0f} | {commands:.1f}"
            f" | {commands / c.models:.1f} | {c.per_step(c.net_in):,.0f} | {c.per_step(c.net_out):,.0f}"
            f" | {net / c.models:,.0f} |"
        )
    print("\nRedis's CPU (Redis runs commands on one thread: one node carries 1 / CPU per step):\n")
    header = "| models | Redis CPU µs/step | of it, main thread | waiting swarm, % of a core"
    print(header + " | steps/s one node carries | Python CPU µs/step | others' CPU, % of a core |")
    print("|" + "---:|" * 7)
    for c in costs:
        cpu, main, carried = c.per_step(c.cpu) * us, c.per_step(c.cpu_main) * us, c.steps / c.cpu
        python, others = c.per_step(c.python) * us, 100 * c.others / c.seconds
        print(
            f"| {c.models} | {cpu:.1f} | {main:.1f} | {100 * c.idle:.1f} | {carried:,.0f} | {python:,.0f}"
            f" | {others:.0f} |"
        )
    names = sorted({n for c in costs for n in c.calls}, key=lambda n: -costs[-1].calls.get(n, 0))
    print("\nCommands per environment step, by command (INFO commandstats):\n")
    print("| command | " + " | ".join(f"{c.models} model(s)" for c in costs) + " |")
    print("|---|" + "---:|" * len(costs))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{c.per_step(c.calls.get(name, 0)):.2f}" for c in costs) + " |")
    print("\nPer step as fixed + per model x models (least squares over the runs):\n")
    print("| per environment step | fixed | per model |")
    print("|---|---:|---:|")
    for label, value, scale in (
        ("commands", "commands", 1),
        ("bytes in + out", "net", 1),
        ("Redis CPU µs", "cpu", us),
    ):
        fixed, per_model = fit(costs, value)
        print(f"| {label} | {fixed * scale:,.1f} | {per_model * scale:,.1f} |")


def run(args: argparse.Namespace) -> None:
    """Measure each ``--models`` count and print the tables."""
    costs = [measure_cost(models, args) for models in args.models]
    report_costs(costs, args.n_envs)

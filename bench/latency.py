"""Where one round of the loop goes: the Redis transport's floor against each component's own work.

A round is one lockstep step of the environment runner's K environments: it publishes K observations,
the model worker answers them, the aggregator turns the answers into K actions, the runner steps.
Two measurements, in one run, on a private ``redis-server``:

1. **Transport floor**: three Python processes relay K-entry rounds through Redis exactly as the
   loop does (a ``MULTI``/``EXEC`` of K ``XADD``\\ s, a blocking ``XREAD`` on the other side), with no
   work in between: the latency the streams themselves cost per round.
2. **In-process SB3** A2C (``bench.parity``'s, same hyper-parameters) on K environments: its time per
   round, split into stepping the environments, its A2C updates, and the rest (forward passes,
   rollout buffer). In lockstep all of that work lies on the loop's path too, between the hops.
3. **The real loop**: ``python -m worker model``, ``aggregator`` and ``env`` as processes, one
   training run of ``--steps`` environment steps; the round time, and the CPU time each process
   spent per round (from ``/proc/<pid>/stat``, the run only: startup excluded). The components run
   in series, so their CPU per round adds up to (about) the round time.

So no lockstep loop through Redis can step faster than the transport floor plus SB3's own work,
unless its components do SB3's work faster than SB3 does; the last table prints that bound.

    python -m bench.latency [--envs 8] [--steps 40000] [--rounds 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.parity import sb3_a2c
from worker.common.connections import connect
from worker.common.servers import embedded_redis
from worker.control.demo import Swarm
from worker.control.train import run_episodes, wait_for_loop, wait_for_models
from worker.protocol import Streams

HZ = os.sysconf("SC_CLK_TCK")


def _relay(url: str, source: str, target: str, k: int) -> None:
    """Forward every K entries of ``source`` to ``target`` as one transaction; stop on a ``stop`` entry."""
    client, cursor, held = redis.Redis.from_url(url), "0-0", 0  # a fresh server: from its start
    while True:
        for _, items in client.xread({source: cursor}, block=1000, count=1000) or []:
            cursor = items[-1][0]
            if any(fields.get(b"stop") for _, fields in items):
                client.xadd(target, {"stop": "1"})
                return
            held += len(items)
            while held >= k:
                held -= k
                with client.pipeline(transaction=True) as pipe:
                    for _ in range(k):
                        pipe.xadd(target, {"x": "1"})
                    pipe.execute()


def transport_floor(url: str, k: int, rounds: int) -> float:
    """Seconds per round of K entries through three hops with no work."""
    relays = [mp.Process(target=_relay, args=(url, a, b, k)) for a, b in (("o", "l"), ("l", "a"))]
    for relay in relays:
        relay.start()
    # From the streams' start (the server is fresh): with "$", what a relay added between two reads
    # would be missed, and the round would wait forever.
    client, cursor = redis.Redis.from_url(url), "0-0"
    time.sleep(1.0)  # the relays are up before the clock starts
    started = time.perf_counter()
    for _ in range(rounds):
        with client.pipeline(transaction=True) as pipe:
            for _ in range(k):
                pipe.xadd("o", {"x": "1"})
            pipe.execute()
        got = 0
        while got < k:
            for _, items in client.xread({"a": cursor}, block=1000, count=1000) or []:
                cursor, got = items[-1][0], got + len(items)
    elapsed = time.perf_counter() - started
    client.xadd("o", {"stop": "1"})
    for relay in relays:
        relay.join(10)
    return elapsed / rounds


def _timed(fn: Callable[..., Any], totals: dict[str, float], key: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    return timed


def sb3_round(k: int, steps: int) -> dict[str, float]:
    """Seconds per round of in-process SB3 A2C: in all, stepping the environments, updating."""
    model = sb3_a2c(0, k)
    model.learn(10 * k)  # warm-up, as for the real loop
    totals = {"env": 0.0, "update": 0.0}
    model.env.step_wait = _timed(model.env.step_wait, totals, "env")  # type: ignore[method-assign]
    model.train = _timed(model.train, totals, "update")  # type: ignore[method-assign]
    started = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    rounds = steps / k
    return {"all": (time.perf_counter() - started) / rounds} | {n: t / rounds for n, t in totals.items()}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def real_loop(url: str, k: int, steps: int) -> tuple[float, dict[str, float]]:
    """Seconds per round of the real loop, and each process's CPU seconds per round (Redis's too)."""
    streams, logdir = Streams("rl"), Path(tempfile.mkdtemp(prefix="rl-latency-"))
    swarm, since = Swarm(url, "rl", logdir), time.time()
    names = ["model", "aggregator", "env", "redis-server"]
    try:
        swarm.start("model", "model", "--component-id", "latency-0", "--seed", "0")
        swarm.start("aggregator", "aggregator", "--seed", "0")
        swarm.start("env", "env", "--n-envs", str(k), "--runner-id", "latency", "--seed", "0")
        client = connect(url)
        pids = [p.pid for p in swarm.processes.values()] + [int(client.info("server")["process_id"])]
        wait_for_models(client, streams, 1)
        wait_for_loop(client, streams, ["latency"], since)
        swarm.check()
        run_episodes(client, streams, steps=10 * k)  # warm-up: imports, first forward passes
        before = [cpu_seconds(pid) for pid in pids]
        started = time.perf_counter()
        result = run_episodes(client, streams, steps=steps)
        elapsed = time.perf_counter() - started
        after = [cpu_seconds(pid) for pid in pids]
    finally:
        swarm.stop()
    rounds = result["steps"] / k
    return elapsed / rounds, {n: (a - b) / rounds for n, a, b in zip(names, after, before, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=8, help="environments, entries per round")
    parser.add_argument("--steps", type=int, default=40_000, help="environment steps of the real loop")
    parser.add_argument("--rounds", type=int, default=3_000, help="rounds of the transport floor")
    args = parser.parse_args(argv)
    with embedded_redis() as url:
        floor = transport_floor(url, args.envs, args.rounds)
        loop, cpu = real_loop(url, args.envs, args.steps)
    sb3 = sb3_round(args.envs, args.steps)
    us = 1e6
    print(f"rounds of {args.envs} environments on a private redis-server\n")
    print("| what | µs per round | rounds/s | environment steps/s |")
    print("|---|---:|---:|---:|")
    for name, seconds in (
        ("transport floor (3 hops, no work)", floor),
        ("in-process SB3 A2C (training)", sb3["all"]),
        ("the real loop (training)", loop),
    ):
        print(f"| {name} | {seconds * us:,.0f} | {1 / seconds:,.0f} | {args.envs / seconds:,.0f} |")
    print("\nCPU per round of the real loop, by process (the three components run in series):\n")
    print("| process | CPU µs per round |")
    print("|---|---:|")
    for name, seconds in cpu.items():
        print(f"| {name} | {seconds * us:,.0f} |")
    print(f"| sum | {sum(cpu.values()) * us:,.0f} |")
    rest = sb3["all"] - sb3["env"] - sb3["update"]
    bound = floor + sb3["all"]
    print("\nIn-process SB3's round, and the bound it sets on any lockstep loop through Redis:\n")
    print("| what | µs per round |")
    print("|---|---:|")
    print(f"| SB3: stepping the {args.envs} environments | {sb3['env'] * us:,.0f} |")
    print(f"| SB3: A2C updates (one every 5 rounds) | {sb3['update'] * us:,.0f} |")
    print(f"| SB3: the rest (forward passes, rollout buffer) | {rest * us:,.0f} |")
    print(f"| transport floor + SB3's whole round | {bound * us:,.0f} ({bound / sb3['all']:.2f}x SB3) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

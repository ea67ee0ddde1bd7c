"""What a client pays per action, by mode, as clients grow: round trip, throughput, bytes read.

``python -m bench.clients [--clients 1 8 64] [--modes ensemble direct local shared] [--seconds 5]
[--warmup 1]``

One run starts a private ``redis-server`` (:func:`worker.common.servers.embedded_redis`), one
model worker (``python -m worker model --component-id bench-m --publish-weights-every 1 --seed 0``)
and the aggregator (``python -m worker aggregator``) as subprocesses, waits until the model is live
in the registry and the aggregator's group exists, then, for every mode and every client count N,
runs N clients for ``--warmup`` seconds and measures them for ``--seconds`` more. Each client is an
:class:`~worker.client.AsyncPolicyClient` with its own client ID, its own connection pool and its
own CartPole-v1 environment, which it steps as an application would: ``act(env, obs)`` at a reset,
``act(env, obs, reward=r)`` after each step, ``end(...)`` when an episode ends.

All N clients run as tasks of one asyncio process (not N threads of ``PolicyClient``): on a 2-core
machine that also runs ``redis-server``, the model and the aggregator, threads would only add GIL
hand-offs to what is measured. So the clients together have at most one core, as one application
process would; a round trip at 64 clients includes waiting for the event loop behind the others.

Modes (rows):

- ``ensemble``: the default client; the aggregator combines the live models' logits (one here);
- ``direct``: ``mode="direct", model="bench-m"``: the model answers its inbox itself, one hop less;
- ``local``: ``mode="local", model="bench-m"``: acts with a copy of the policy, streams the steps
  to the model (``flush_every`` 16) and reloads the weights it publishes;
- ``shared``: the old way, for comparison: ensemble with ``shared_replies=True``, every client
  reading every action from the shared ``<prefix>:action`` stream and skipping the others'.

Columns:

- ``p50 act`` / ``p99 act``: the time of one ``await client.act(...)`` (a round trip, except in
  local mode, where most calls are answered in-process without yielding to the event loop and every
  16th also flushes, waiting meanwhile for the other clients' tasks: so local p99 grows with N),
  in µs, for the calls begun and finished inside the measured window;
- ``steps/s``: actions delivered per second, all clients together (one per environment step or reset);
- ``bytes/action``: bytes the clients' connections received from Redis in the window (counted as
  the socket delivers them to asyncio, below any parser: :class:`CountingConnection`) divided by
  the actions delivered in it;
- ``client CPU µs/step``: the client process's CPU time per action (environments included).

The last line is the verdict: bytes/action at the most clients over the fewest, per mode; it stays
about 1 when each client reads only its own replies, and grows with N for ``shared``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from worker.aggregator import GROUP as AGGREGATOR_GROUP
from worker.client import ActionTimeout, AsyncPolicyClient
from worker.common import logs
from worker.common.connections import connect
from worker.common.registry import live_models
from worker.common.servers import embedded_redis
from worker.control.demo import Swarm
from worker.protocol import Streams

MODES = ("ensemble", "direct", "local", "shared")
MODEL = "bench-m"
PREFIX = "rl"
FLAT = 2.0  # bytes/action growing less than this from fewest to most clients counts as flat


# --------------------------------------------------------------------------- counting bytes


@dataclass
class Tally:
    """Bytes received from Redis by every connection that shares this tally."""

    received: int = 0


class _CountingReader(asyncio.StreamReader):
    tally: Tally

    def feed_data(self, data: bytes) -> None:
        # The transport hands every chunk read from the socket to feed_data: counting here counts
        # what came over the wire, whichever parser (hiredis or Python) reads it later.
        self.tally.received += len(data)
        super().feed_data(data)


class CountingConnection(Connection):
    """A redis.asyncio TCP connection that adds the bytes it receives to ``tally``."""

    def __init__(self, *, tally: Tally, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tally = tally

    async def _connect(self) -> None:
        await super()._connect()
        # asyncio.open_connection builds its own StreamReader; giving that instance a subclass
        # that only adds counting, before a single byte has arrived, misses nothing (the
        # handshake's replies are counted too, before any window opens).
        reader = self._reader
        assert reader is not None
        reader.__class__ = _CountingReader
        reader.tally = self.tally  # type: ignore[attr-defined]


def counted_redis(url: str, tally: Tally) -> aioredis.Redis:
    """A redis.asyncio client of its own pool, every connection of which counts into ``tally``."""
    pool = aioredis.ConnectionPool.from_url(
        url, connection_class=CountingConnection, tally=tally, socket_timeout=60
    )
    return aioredis.Redis(connection_pool=pool)


# --------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    """One mode at one client count: what the clients measured in the window."""

    mode: str
    clients: int
    measuring: bool = False
    stopping: bool = False
    latencies: list[int] = field(default_factory=list)  # ns, calls wholly inside the window
    actions: int = 0  # delivered inside the window
    timeouts: int = 0
    seconds: float = 0.0
    received: int = 0  # bytes, inside the window
    cpu: float = 0.0  # client process CPU seconds, inside the window

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) / 1e3 if self.latencies else float("nan")

    @property
    def rate(self) -> float:
        return self.actions / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_action(self) -> float:
        return self.received / self.actions if self.actions else float("nan")


def make_client(url: str, mode: str, tally: Tally, client_id: str) -> AsyncPolicyClient:
    options: dict[str, Any] = {"client_id": client_id}
    if mode in ("direct", "local"):
        options.update(mode=mode, model=MODEL)
    elif mode == "shared":
        options["shared_replies"] = True
    return AsyncPolicyClient(counted_redis(url, tally), prefix=PREFIX, **options)


async def drive(cell: Cell, client: AsyncPolicyClient, env_id: str, seed: int) -> None:
    """Step one CartPole-v1 environment on the client's actions until the cell stops."""
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    reward: float | None = None  # None: the first observation of an episode
    try:
        while not cell.stopping:
            began, inside = time.perf_counter_ns(), cell.measuring
            try:
                action = await client.act(env_id, obs, reward=reward)
            except ActionTimeout:
                cell.timeouts += 1
                client.forget(env_id)  # its chain restarts with a fresh episode
                obs, _ = env.reset()
                reward = None
                continue
            if cell.measuring:
                cell.actions += 1
                if inside:
                    cell.latencies.append(time.perf_counter_ns() - began)
            obs, r, terminated, truncated, _ = env.step(action)
            reward = float(r)
            if terminated or truncated:
                await client.end(env_id, obs, reward=reward, terminated=terminated, truncated=truncated)
                obs, _ = env.reset()
                reward = None
    finally:
        env.close()


async def run_cell(url: str, mode: str, n: int, warmup: float, seconds: float) -> Cell:
    cell, tally = Cell(mode, n), Tally()
    clients = [make_client(url, mode, tally, f"bench-{mode}-{n}-{k}") for k in range(n)]
    try:
        # discovery (spaces; local mode: the policy) before the clock starts
        await asyncio.gather(*(c.spaces() for c in clients))
        tasks = [
            asyncio.create_task(drive(cell, c, f"{mode}-{n}-{k}", seed=k)) for k, c in enumerate(clients)
        ]
        await asyncio.sleep(warmup)
        received, cpu, started = tally.received, time.process_time(), time.perf_counter()
        cell.measuring = True
        await asyncio.sleep(seconds)
        cell.measuring = False
        cell.seconds = time.perf_counter() - started
        cell.received, cell.cpu = tally.received - received, time.process_time() - cpu
        cell.stopping = True
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.close()
            await c.redis.aclose(close_connection_pool=True)  # ours: the client closes only what it made
    return cell


# --------------------------------------------------------------------------- setup


def wait_until(what: str, ready: Any, timeout: float, swarm: Swarm) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        swarm.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout}s")
        time.sleep(0.1)


def has_group(client: redis.Redis, stream: str, group: str) -> bool:
    try:
        return any(g["name"].decode() == group for g in client.xinfo_groups(stream))
    except redis.ResponseError:
        return False  # no such stream yet


def settled(client: redis.Redis, streams: Streams) -> bool:
    """The model has answered and committed everything sent so far (so a cell does not pay for
    the backlog of the one before it)."""
    for stream in (streams.observation, streams.inbox(MODEL)):
        for group in client.xinfo_groups(stream) if client.exists(stream) else []:
            if group["name"].decode() == Streams.group(MODEL) and (group["pending"] or group["lag"]):
                return False
    return True


# --------------------------------------------------------------------------- report


def table(cells: list[Cell]) -> str:
    lines = [
        "| mode | clients | p50 act µs | p99 act µs | steps/s | bytes/action | client CPU µs/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        cpu = c.cpu / c.actions * 1e6 if c.actions else float("nan")
        lines.append(
            f"| {c.mode} | {c.clients} | {c.percentile(50):,.0f} | {c.percentile(99):,.0f} "
            f"| {c.rate:,.0f} | {c.bytes_per_action:,.0f} | {cpu:,.0f} |"
        )
    return "\n".join(lines)


def verdict(cells: list[Cell]) -> str:
    parts = []
    for mode in dict.fromkeys(c.mode for c in cells):
        row = sorted((c for c in cells if c.mode == mode), key=lambda c: c.clients)
        if len(row) < 2:
            continue
        ratio = row[-1].bytes_per_action / row[0].bytes_per_action
        shape = "flat" if ratio < FLAT else "grows"
        parts.append(f"{mode} {ratio:.2f}x ({shape})")
    if not parts:
        return "verdict: needs at least two client counts"
    few, many = min(c.clients for c in cells), max(c.clients for c in cells)
    return f"verdict: bytes/action at {many} clients vs {few}: " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="client counts")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="rows to run")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.clients):
        parser.error("--clients must be positive")

    logs.configure("warning")
    began, cells = time.perf_counter(), []
    streams, logdir = Streams(PREFIX), Path(tempfile.mkdtemp(prefix="rl-bench-clients-"))
    with embedded_redis() as url:
        client = connect(url)
        swarm = Swarm(url, PREFIX, logdir)
        try:
            model = ["--component-id", MODEL, "--publish-weights-every", "1", "--seed", "0"]
            swarm.start("model", "model", *model)
            swarm.start("aggregator", "aggregator", "--seed", "0")
            wait_until("model", lambda: MODEL in live_models(client, streams), 120, swarm)
            wait_until("aggregator", lambda: has_group(client, streams.logits, AGGREGATOR_GROUP), 60, swarm)
            for mode in args.modes:
                for n in args.clients:
                    wait_until("model backlog", lambda: settled(client, streams), 60, swarm)
                    cells.append(asyncio.run(run_cell(url, mode, n, args.warmup, args.seconds)))
                    c = cells[-1]
                    print(
                        f"{mode} x{n}: {c.actions:,} actions, {c.rate:,.0f}/s,"
                        f" {c.bytes_per_action:,.0f} B/action, {c.timeouts} timeouts",
                        file=sys.stderr,
                        flush=True,
                    )
                    swarm.check()
        finally:
            with contextlib.suppress(Exception):
                client.close()
            swarm.stop()
    print(
        f"clients on a private redis-server, one model ({MODEL}) and the aggregator;"
        f" {args.seconds:g} s measured per cell after {args.warmup:g} s of warm-up\n"
    )
    print(table(cells))
    if timeouts := sum(c.timeouts for c in cells):
        print(f"\n{timeouts} act() calls timed out (see the logs in {logdir})")
    print()
    print(verdict(cells))
    print(f"(whole run: {time.perf_counter() - began:.0f} s; logs of the model and aggregator: {logdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

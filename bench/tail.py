"""Reply latency of one model worker under an offered load: its median and its tail.

``python -m bench.tail [--offered 1000 5000 10000] [--envs 16] [--seconds 20]``

For each offered load, on a private ``redis-server``, one ``python -m worker model`` process (its
defaults, CartPole-v1's spaces) answers observations that this bench publishes at a fixed rate,
whatever the answers (an open loop, as environments that do not wait would): ``--envs`` CartPole-v1
environments stepped with random actions in turn, each observation after the first of an episode
carrying its REWARD and ACTION, so the model records transitions and trains as it answers. The
publishing is paced each millisecond (a pipeline of the entries due by then).

Latency is read on Redis's own clock: the reply's entry ID minus its observation's (both stamped by
the server, in milliseconds), for every observation of the measured window (after a warm-up). It
waits until every observation is answered (a backlog's delay counts), and prints, per load, the
latency's median, 90th and 99th percentiles and maximum, and the model's CPU (percent of one core,
while offered), its A2C updates and commits.
A 60 frames per second game has 16 ms per frame.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import msgpack
import numpy as np
import redis

from bench.latency import cpu_seconds
from worker.common.servers import embedded_redis
from worker.protocol import split_id

PREFIX = "rl"


class Environments:
    """``n`` CartPole-v1 environments stepped in turn with random actions: the messages they send."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.envs = [gym.make("CartPole-v1") for _ in range(n)]
        self.rng = np.random.default_rng(seed)
        self.last: list[dict | None] = [None] * n
        self.turn = 0
        for k, env in enumerate(self.envs):
            obs, _ = env.reset(seed=seed + k)
            self.last[k] = {"OBSERVATION": obs.tolist(), "ENV_ID": f"e{k}"}

    def next(self) -> dict:
        """The next environment's message; that environment then steps (a random action)."""
        k, self.turn = self.turn, (self.turn + 1) % len(self.envs)
        message = self.last[k]
        assert message is not None
        action = int(self.rng.integers(2))
        obs, reward, terminated, truncated, _ = self.envs[k].step(action)
        if terminated or truncated:
            obs, _ = self.envs[k].reset()
            self.last[k] = {"OBSERVATION": obs.tolist(), "ENV_ID": f"e{k}"}  # a new chain
        else:
            step = {"REWARD": reward, "ACTION": action}  # for the step that led here
            self.last[k] = {"OBSERVATION": obs.tolist(), "ENV_ID": f"e{k}", **step}
        return message


def offer(client: redis.Redis, envs: Environments, rate: float, seconds: float) -> list[str]:
    """Publish ``rate`` observations per second for ``seconds``; the IDs of those published."""
    ids: list[str] = []
    started = time.perf_counter()
    sent = 0
    while (now := time.perf_counter() - started) < seconds:
        due = int(now * rate) - sent
        if due > 0:
            with client.pipeline(transaction=False) as pipe:
                for _ in range(due):
                    pipe.xadd(f"{PREFIX}:observation", {"data": msgpack.packb(envs.next())})
                ids += [i.decode() for i in pipe.execute()]
            sent += due
        time.sleep(0.0005)
    return ids


def latencies(client: redis.Redis, published: set[str]) -> np.ndarray:
    """Milliseconds from each published observation to its reply, on Redis's clock."""
    found = []
    cursor = "-"
    while items := client.xrange(f"{PREFIX}:logits", min=cursor, count=10_000):
        for entry_id, fields in items:
            obs_id = msgpack.unpackb(fields[b"data"])["OBS_ID"]
            if obs_id in published:
                found.append(split_id(entry_id.decode())[0] - split_id(obs_id)[0])
        cursor = "(" + items[-1][0].decode()
    return np.array(found, dtype=np.float64)


def measure(url: str, rate: float, n_envs: int, seconds: float, warmup: float) -> dict:
    """One offered load against a fresh model worker process."""
    client = redis.Redis.from_url(url)
    client.flushall()
    log = Path(tempfile.mkdtemp(prefix="rl-tail-")) / "model.log"
    command = [sys.executable, "-m", "worker", "model", "--redis-url", url, "--component-id", "m1"]
    command += ["--stream-maxlen", "10000000"]  # every reply kept, to be timed
    with open(log, "w") as out:
        model = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not client.exists(f"{PREFIX}:model:m1:info"):  # its first heartbeat: ready
            if model.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model did not start: {log}")
            time.sleep(0.05)
        envs = Environments(n_envs)
        offer(client, envs, rate, warmup)
        cpu0, t0 = cpu_seconds(model.pid), time.monotonic()
        info0 = client.hgetall(f"{PREFIX}:model:m1:info")
        ids = offer(client, envs, rate, seconds)
        cpu = (cpu_seconds(model.pid) - cpu0) / (time.monotonic() - t0)
        drained = time.monotonic() + 60  # every observation answered, however late: a backlog counts
        while client.xinfo_groups(f"{PREFIX}:observation")[0]["lag"] and time.monotonic() < drained:
            time.sleep(0.1)
        time.sleep(0.2)
        info = client.hgetall(f"{PREFIX}:model:m1:info")
        ms = latencies(client, set(ids))
    finally:
        model.terminate()
        model.wait(timeout=30)
    return {
        "offered": rate,
        "kept up": bool(len(ms)) and float(np.percentile(ms, 99)) < 1000 * seconds / 10,
        "missing": len(ids) - len(ms),
        "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p90": float(np.percentile(ms, 90)) if len(ms) else float("nan"),
        "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "max": float(ms.max()) if len(ms) else float("nan"),
        "cpu": 100 * cpu,
        "updates": int(info.get(b"updates", 0)) - int(info0.get(b"updates", 0)),
        "commits": int(info.get(b"version", 0)) - int(info0.get(b"version", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offered", type=float, nargs="+", default=[1000, 5000, 10000], help="obs/s")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    rows = []
    with embedded_redis() as url:
        for rate in args.offered:
            rows.append(measure(url, rate, args.envs, args.seconds, args.warmup))
            print(rows[-1], flush=True)
    print(
        "| offered obs/s | unanswered | p50 ms | p90 ms | p99 ms | max ms | model CPU %"
        " | updates | commits |"
    )
    print("|" + "---:|" * 9)
    for r in rows:
        print(
            f"| {r['offered']:,.0f} | {r['missing']} | {r['p50']:.0f} | {r['p90']:.0f}"
            f" | {r['p99']:.0f} | {r['max']:.0f} | {r['cpu']:.0f} | {r['updates']} | {r['commits']} |"
        )


if __name__ == "__main__":
    main()

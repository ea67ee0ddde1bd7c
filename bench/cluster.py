"""Environment steps per second of the whole loop on one redis-server and on a Redis Cluster, with
every process's CPU; and, with ``--capacity``, what one environment step costs Redis.

    python -m bench.cluster [--cases single cluster cluster3] [--seconds 20] [--warmup 5] [--n-envs 8]
    python -m bench.cluster --capacity [--models 1 2 8] [--seconds 20] [--warmup 5] [--n-envs 8]

A swarm is one model worker, the aggregator and one environment runner with ``--n-envs``
CartPole-v1 environments acting through the aggregator (ensemble mode), each a ``python -m worker``
process (:class:`worker.control.demo.Swarm`). The cases:

- ``single``: one swarm (prefix ``{a}``) on a private ``redis-server``;
- ``cluster``: one swarm (``{a}``) on a private Redis Cluster of 3 primaries and 3 replicas
  (:func:`worker.common.servers.embedded_cluster`), the components started with ``--cluster``;
- ``cluster3``: three swarms (``{a}``, ``{b}``, ``{c}``) at once on that cluster. Their hash tags'
  slots lie on three different primaries; the table says which port serves each.

Each swarm gets one RUN of a practically endless number of steps; once every swarm steps, and
``--warmup`` seconds later, a window of ``--seconds`` begins. Environment steps are the entries
added to each swarm's ``<prefix>:observation`` during the window (``XINFO STREAM``'s
``entries-added``: one entry per step, trimming aside); CPU is ``utime + stime`` of
``/proc/<pid>/stat`` over the window, in percent of one core, for every process: the components and
every ``redis-server`` node; and the whole machine's (``/proc/stat``), so that other work on a
shared machine shows. So the reader sees what limits the loop and what the cluster adds (the
replicas' CPU, the cluster client's extra work). A swarm's components run in series (the runner
waits for each round's actions), so one swarm keeps about one core busy; more swarms fill the rest.

``--capacity`` measures instead what one environment step costs Redis (commands, bytes, CPU), for
one swarm of 1, 2 and 8 models (``--models``): see :mod:`bench.capacity` and docs/scaling.md.

The figures are CPU times, not wall time, but on a busy machine they still move: compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.latency import HZ, cpu_seconds
from worker.common.connections import connect
from worker.common.servers import LocalCluster, embedded_cluster, embedded_redis
from worker.control.demo import Swarm
from worker.control.train import wait_for_loop, wait_for_models
from worker.protocol import Encoding, Run, Streams, encode_entry, run_command, stop_command

ENDLESS = 10**9  # steps of the RUN each swarm gets: it runs until the swarm is stopped
RUNNER = "bench"
CASES = {
    "single": "1 swarm on one redis-server",
    "cluster": "1 swarm on a Redis Cluster (3 primaries, 3 replicas)",
    "cluster3": "3 swarms at once on the Redis Cluster",
}
MACHINE = "machine"  # in Window.cpu: every process on the machine, this bench's and others'


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used so far (``/proc/stat``: all but idle)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / HZ  # idle, iowait


def steps_so_far(client: redis.Redis, streams: Streams) -> int:
    """Entries ever added to the swarm's observation stream: its environment steps (one each)."""
    return int(client.xinfo_stream(streams.observation)["entries-added"])


@dataclass
class Loop:
    """The swarms of one case, their client and every process to watch (name -> pid)."""

    client: redis.Redis
    prefixes: list[str]
    swarms: list[Swarm] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        for swarm in self.swarms:
            swarm.check()


@dataclass
class Window:
    """What one measuring window saw."""

    seconds: float
    steps: dict[str, int]  # by swarm prefix
    cpu: dict[str, float]  # by process name: CPU seconds in the window

    def percent(self, name: str) -> float:
        return 100 * self.cpu[name] / self.seconds

    @property
    def rate(self) -> float:
        return sum(self.steps.values()) / self.seconds


@contextlib.contextmanager
def swarms(url: str, prefixes: list[str], cluster: bool, models: int, n_envs: int) -> Iterator[Loop]:
    """Start one swarm per prefix (``models`` model workers, the aggregator, a runner) and wait
    until each loop is ready; stop them all on exit (:func:`go` starts them stepping).

    :param cluster: ``url`` names a node of a Redis Cluster (the components get ``--cluster``)
    """
    loop = Loop(connect(url, cluster=cluster), prefixes)
    logdir = Path(tempfile.mkdtemp(prefix="rl-bench-cluster-"))
    since = time.time()
    try:
        for prefix in prefixes:
            tag = prefix.strip("{}")
            swarm = Swarm(url, prefix, logdir, cluster)
            loop.swarms.append(swarm)
            for i in range(models):
                swarm.start(f"{tag}-model-{i}", "model", "--component-id", f"{tag}-{i}", "--seed", str(i))
            swarm.start(f"{tag}-aggregator", "aggregator", "--seed", "0")
            swarm.start(f"{tag}-env", "env", "--n-envs", str(n_envs), "--runner-id", RUNNER, "--seed", "0")
            loop.pids |= {f"{prefix} {n.removeprefix(tag + '-')}": p.pid for n, p in swarm.processes.items()}
        print(f"logs: {logdir}", file=sys.stderr)
        wait_ready(loop, models, since)
        yield loop
    finally:
        for prefix in prefixes:
            with contextlib.suppress(redis.RedisError):
                stop = encode_entry(stop_command(), Encoding.MSGPACK)
                loop.client.xadd(Streams(prefix).control, stop, maxlen=1000, approximate=True)
        for swarm in loop.swarms:
            swarm.stop()
        loop.client.close()


def wait_ready(loop: Loop, models: int, since: float, timeout: float = 300.0) -> None:
    """Until every swarm's models are live and its aggregator and runner ready (after ``since``);
    a component that exits meanwhile stops the wait at once (its log says why)."""
    deadline = time.monotonic() + timeout
    for prefix in loop.prefixes:
        while True:
            loop.check()
            try:
                wait_for_models(loop.client, Streams(prefix), models, timeout=1.0)
                wait_for_loop(loop.client, Streams(prefix), [RUNNER], since, timeout=1.0)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
    loop.check()


def go(loop: Loop) -> None:
    """Give each swarm's runner one training RUN that never ends (until the swarm is stopped)."""
    for prefix in loop.prefixes:
        run = encode_entry(run_command(Run(uuid.uuid4().hex[:12], steps=ENDLESS)), Encoding.MSGPACK)
        loop.client.xadd(Streams(prefix).control, run, maxlen=1000, approximate=True)


def warm_up(loop: Loop, seconds: float, timeout: float = 120.0) -> None:
    """Until every swarm has stepped, then ``seconds`` more (first forward passes, first updates)."""
    deadline = time.monotonic() + timeout
    while not all(steps_so_far(loop.client, Streams(p)) > 0 for p in loop.prefixes):
        loop.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swarms did not step within {timeout}s")
        time.sleep(0.2)
    time.sleep(seconds)


def measure(loop: Loop, seconds: float) -> Window:
    """Steps of every swarm and CPU of every process over ``seconds`` of wall-clock."""

    def snapshot() -> tuple[float, dict[str, int], dict[str, float]]:
        steps = {p: steps_so_far(loop.client, Streams(p)) for p in loop.prefixes}
        cpu = {n: cpu_seconds(pid) for n, pid in loop.pids.items()} | {MACHINE: machine_busy()}
        return time.perf_counter(), steps, cpu

    t0, steps0, cpu0 = snapshot()
    time.sleep(seconds)
    t1, steps1, cpu1 = snapshot()
    loop.check()  # a component that died in the window would make the figures meaningless
    return Window(
        t1 - t0,
        {p: steps1[p] - steps0[p] for p in loop.prefixes},
        {n: cpu1[n] - cpu0[n] for n in cpu0},
    )


# --------------------------------------------------------------------------- throughput cases


@dataclass
class CaseResult:
    case: str
    window: Window
    served_by: dict[str, str]  # swarm prefix -> the node that serves it
    redis: list[str]  # names of the redis-server processes in window.cpu

    def percents(self) -> tuple[float, float, float]:
        """CPU, % of one core: this case's Python processes, its redis-server nodes, everything else
        on the machine (other people's work on a shared machine)."""
        w = self.window
        python = sum(w.percent(n) for n in w.cpu if n not in self.redis and n != MACHINE)
        nodes = sum(w.percent(n) for n in self.redis)
        return python, nodes, w.percent(MACHINE) - python - nodes


def run_case(case: str, url: str, cluster: LocalCluster | None, args: argparse.Namespace) -> CaseResult:
    """One case on the Redis at ``url`` (``cluster`` if it is one): start, warm up, measure, stop."""
    prefixes = ["{a}", "{b}", "{c}"] if case == "cluster3" else ["{a}"]
    served = {
        p: f":{cluster.master_of(Streams(p).observation)}" if cluster else "the one node" for p in prefixes
    }
    if len(set(served.values())) < len(prefixes):
        print(f"{case}: the swarms share primaries: {served}", file=sys.stderr)
    nodes = redis_nodes(url, cluster, served)
    print(f"{case}: starting {len(prefixes)} swarm(s)", file=sys.stderr)
    with swarms(url, prefixes, cluster is not None, 1, args.n_envs) as loop:
        loop.pids |= nodes
        go(loop)
        warm_up(loop, args.warmup)
        window = measure(loop, args.seconds)
    print(f"{case}: {window.rate:,.0f} steps/s", file=sys.stderr)
    return CaseResult(case, window, served, list(nodes))


def redis_nodes(url: str, cluster: LocalCluster | None, served: dict[str, str]) -> dict[str, int]:
    """Every redis-server process, named by port, role and the swarms it serves -> its pid."""
    if cluster is None:
        with redis.Redis.from_url(url) as client:
            return {"redis-server": int(client.info("server")["process_id"])}
    nodes = {}
    for port, process in sorted(cluster.processes.items()):
        with cluster.node(port) as client:
            role = client.info("replication")
        if role["role"] == "master":
            mine = [p for p, node in served.items() if node == f":{port}"]
            label = f"redis :{port} primary" + (f" of {', '.join(mine)}" if mine else "")
        else:
            label = f"redis :{port} replica of :{role['master_port']}"
        if port == cluster.ports[0]:
            label += " (in the URL)"  # the cluster clients' default node
        nodes[label] = process.pid
    return nodes


def report_case(result: CaseResult, n_envs: int) -> None:
    w = result.window
    print(f"\n## {result.case}: {CASES[result.case]}, {n_envs} environments per runner, {w.seconds:.1f} s\n")
    print("| swarm | served by | steps | steps/s |")
    print("|---|---|---:|---:|")
    for prefix, steps in w.steps.items():
        print(f"| `{prefix}` | {result.served_by[prefix]} | {steps:,} | {steps / w.seconds:,.0f} |")
    if len(w.steps) > 1:
        print(f"| all | | {sum(w.steps.values()):,} | {w.rate:,.0f} |")
    steps = max(sum(w.steps.values()), 1)
    print("\n| process | CPU, % of one core | CPU µs per environment step |")
    print("|---|---:|---:|")
    python, nodes, others = result.percents()
    rows = [(n, w.percent(n)) for n in w.cpu if n != MACHINE]
    rows += [("**Python processes**", python), ("**redis-server nodes**", nodes)]
    rows += [("everything else on the machine (other processes, interrupts)", others)]
    rows += [(f"**the machine ({os.cpu_count()} cores)**", w.percent(MACHINE))]
    for name, percent in rows:
        print(f"| {name} | {percent:.0f} | {percent / 100 * w.seconds / steps * 1e6:,.0f} |")


def report_summary(results: list[CaseResult]) -> None:
    base = next((r.window.rate for r in results if r.case == "single"), None)
    print("\n## Summary\n")
    print("| case | swarms | steps/s | vs single | Python CPU % | Redis CPU % | others' CPU % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rate, ratio = r.window.rate, f"{r.window.rate / base:.2f}x" if base else "-"
        python, nodes, others = r.percents()
        cpu = f"{python:.0f} | {nodes:.0f} | {others:.0f}"
        print(f"| {r.case} | {len(r.window.steps)} | {rate:,.0f} | {ratio} | {cpu} |")


def run_cases(args: argparse.Namespace) -> None:
    results = []
    if "single" in args.cases:
        with embedded_redis() as url:
            results.append(run_case("single", url, None, args))
    on_cluster = [c for c in ("cluster", "cluster3") if c in args.cases]
    if on_cluster:
        with embedded_cluster() as cluster:
            for case in on_cluster:
                with connect(cluster.url, cluster=True) as client:
                    client.flushall()  # each case starts from an empty cluster
                results.append(run_case(case, cluster.url, cluster, args))
    for result in results:
        report_case(result, args.n_envs)
    report_summary(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="what to run")
    parser.add_argument("--seconds", type=float, default=20.0, help="the measuring window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of stepping before the window")
    parser.add_argument("--n-envs", type=int, default=8, help="environments per runner")
    parser.add_argument("--capacity", action="store_true", help="measure what a step costs Redis instead")
    parser.add_argument("--models", type=int, nargs="+", default=[1, 2, 8], help="--capacity: models per run")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.capacity:
        from bench import capacity  # imports this module: not at the top, where it would be circular

        capacity.run(args)
    else:
        run_cases(args)
    print(f"\n(bench wall time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Failovers under load: what a swarm loses and repeats when the primary holding it dies.

``python -m bench.failover --failovers 5 --wait-replicas 0 1 --replica-lag-ms 0 3000`` starts a
private Redis Cluster (3 primaries, 3 replicas), and for each pair of values one swarm on it (a model
worker with that ``--wait-replicas``, the aggregator, an environment runner of ``--n-envs``
CartPole-v1 environments, all ``--cluster`` processes), trains, and ``SIGKILL``\\ s the primary
serving the swarm's slot ``--failovers`` times, each time once the loop runs again and the killed
node is back as a replica and in sync. With a replica lag, the replica is paused (``SIGSTOP``) that
long before each kill and resumed after it: a replica behind, as over a slow or congested network.
On one machine's loopback a replica otherwise gets every write within microseconds, and a kill
loses nothing to measure.

Replication is asynchronous: a primary acknowledges a write before its replica has it, so the
writes of its last moments can vanish with it. An observer (its own cluster client, reading the
swarm's streams as they grow) records every entry it saw; after each failover, the entries of the
seconds before the kill are compared with what survived on the promoted replica:

- *observations lost*: steps a runner published that are gone (the runner waits, then sends again);
- *model replies lost*: logits the aggregator may have read, gone with the commit that wrote them;
- *answered twice*: observations answered again after the failover (their first answer was lost);
- *actions lost*: decisions the runner may have acted on, gone;
- *commits rolled back* and *transitions redone*: what the model worker had committed and found
  gone when it reloaded (its log line), so it learned those transitions again from the survivors.

At the end the loop is drained and the model's committed counters are compared with what the
surviving observations imply (``tests/faults/chaos/checks.py``): exact means nothing was learned
twice or lost from the state's point of view, whatever the failovers rolled back. The observer's
counts are lower bounds: an entry written and lost between two of its reads is not seen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.faults.chaos.checks import drained, implied_counters
from worker.common.connections import after_cluster_error, connect, text
from worker.common.servers import LocalCluster, embedded_cluster
from worker.control.demo import Swarm as DemoSwarm
from worker.control.train import wait_for_loop, wait_for_models
from worker.protocol import Encoding, Streams, decode_entry, encode_entry, split_id
from worker.protocol.commands import Run, run_command, stop_command

MODEL, RUNNER_ID, N_STEPS = "m1", "r", 5


@dataclass
class Figures:
    """One case: ``failovers`` kills of the primary, with ``wait_replicas`` on the model's commits."""

    wait_replicas: int
    wait_timeout_ms: int = 1000
    replica_lag_ms: int = 0  # the replica is paused this long before each kill
    failovers: int = 0
    observations: int = 0  # surviving observations at the end
    observations_lost: int = 0
    replies_lost: int = 0
    answered_twice: int = 0
    actions_lost: int = 0
    commits_rolled_back: int = 0
    transitions_redone: int = 0
    unreplicated: int = 0  # commits WAIT returned from with fewer replicas than asked
    resent: int = 0  # times the runner sent its steps again after a whole action timeout
    downtime: list[float] = field(default_factory=list)  # kill -> the time stamp of the next answer
    steps_per_second: float = 0.0  # before the first failover
    counters_exact: bool = False
    counter_mismatch: str = ""
    crashed: list[str] = field(default_factory=list)
    updates_after: int = 0  # A2C updates committed after the last failover


class Observer(threading.Thread):
    """Reads the swarm's streams as they grow and remembers every entry it saw (ID -> OBS_ID)."""

    def __init__(self, url: str, streams: Streams) -> None:
        super().__init__(daemon=True)
        self.client = connect(url, cluster=True)
        self.names = [streams.observation, streams.logits, streams.replies(RUNNER_ID)]
        self.seen: dict[str, dict[str, str]] = {name: {} for name in self.names}
        self.cursors = {name: "0-0" for name in self.names}
        self.halt = threading.Event()
        self.newest_logits_ms = 0  # the time stamp (entry ID) of the newest model reply seen

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                reply = self.client.xread(self.cursors, count=1000, block=100)
            except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                after_cluster_error(self.client, exc)
                time.sleep(0.02)
                continue
            for raw, items in reply or []:
                name = text(raw)
                for entry_id, fields in items:
                    eid = text(entry_id)
                    self.cursors[name] = eid
                    message = decode_entry(fields, 1 << 24)[0] if fields else {}
                    self.seen[name][eid] = str(message.get("OBS_ID", ""))
                    if name == self.names[1]:
                        self.newest_logits_ms = max(self.newest_logits_ms, split_id(eid)[0])


class Swarm(DemoSwarm):
    """The swarm's processes (``python -m worker ... --log-json`` on the cluster), by name: ``model``,
    ``aggregator``, ``runner``; their logs in a folder."""

    def __init__(self, url: str, prefix: str, figures: Figures, n_envs: int, logdir: Path) -> None:
        super().__init__(url, prefix, logdir, cluster=True)
        # Nothing trimmed: the counters are checked against every observation at the end.
        common = ["--log-json", "--stream-maxlen", "10000000"]
        model = ["--component-id", MODEL, "--seed", "0", "--lease-ttl", "2", "--n-steps", str(N_STEPS)]
        wait = figures.wait_replicas, figures.wait_timeout_ms
        model += ["--wait-replicas", str(wait[0]), "--wait-timeout-ms", str(wait[1])]
        self.start("model", "model", *model, *common)
        self.start("aggregator", "aggregator", *common)
        runner = ["--runner-id", RUNNER_ID, "--n-envs", str(n_envs), "--seed", "0", "--no-trim-replies"]
        self.start("runner", "env", *runner, "--action-timeout", "10", *common)

    def crashed(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def lines(self, name: str) -> list[dict[str, Any]]:
        """What ``name`` logged, one JSON line each."""
        found = []
        for line in (self.logdir / f"{name}.log").read_text().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found


def wait_until(condition: Any, what: str, swarm: Swarm, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if swarm.crashed():
            raise RuntimeError(f"{swarm.crashed()} exited while waiting for {what}; logs: {swarm.logdir}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; logs: {swarm.logdir}")
        time.sleep(0.05)


def losses(observer: Observer, client: redis.Redis, kill_ms: int, figures: Figures) -> None:
    """Compare what the observer saw in the 10 s before the kill with what survived it."""
    since = kill_ms - 10_000
    observations, logits, actions = observer.names
    survived = {n: {text(i): f for i, f in client.xrange(n, min=f"{since}-0")} for n in observer.names}

    seen_now = {name: dict(observer.seen[name]) for name in observer.names}  # (it reads on)

    def lost(name: str) -> int:
        seen = {i for i in seen_now[name] if since <= split_id(i)[0] <= kill_ms}
        return len(seen - survived[name].keys())

    figures.observations_lost += lost(observations)
    figures.replies_lost += lost(logits)
    figures.actions_lost += lost(actions)
    # Every model reply since the window began, seen or surviving: two for one observation means
    # its first answer was lost and it was answered again.
    replies = {i: obs for i, obs in seen_now[logits].items() if split_id(i)[0] >= since}
    for i, fields in survived[logits].items():
        replies.setdefault(i, str(decode_entry(fields, 1 << 24)[0].get("OBS_ID", "")))
    figures.answered_twice += sum(1 for n in Counter(replies.values()).values() if n > 1)


def failover_case(
    cluster: LocalCluster,
    wait_replicas: int,
    failovers: int,
    n_envs: int,
    replica_lag_ms: int = 0,
    wait_timeout_ms: int = 1000,
) -> Figures:
    """One swarm on ``cluster``, trained through ``failovers`` kills of its primary.

    :param wait_replicas: the model's ``--wait-replicas``
    :param replica_lag_ms: pause the primary's replica this long before each kill (0: no pause)
    :param wait_timeout_ms: the model's ``--wait-timeout-ms``
    """
    prefix = f"{{fo{wait_replicas}-{time.monotonic_ns() % 100_000}}}"
    streams, figures = Streams(prefix), Figures(wait_replicas, wait_timeout_ms, replica_lag_ms)
    client = connect(cluster.url, cluster=True)
    swarm = Swarm(cluster.url, prefix, figures, n_envs, Path(tempfile.mkdtemp(prefix="rl-failover-")))
    observer = Observer(cluster.url, streams)
    try:
        wait_for_models(client, streams, 1)
        wait_for_loop(client, streams, [RUNNER_ID], since=0)
        observer.start()
        client.xadd(streams.control, encode_entry(run_command(Run("train", steps=10**9)), Encoding.MSGPACK))
        wait_until(lambda: len(observer.seen[streams.observation]) > 2000, "training to run", swarm)
        seen, started = observer.seen[streams.observation], time.monotonic()
        count = len(seen)
        time.sleep(5)
        figures.steps_per_second = (len(seen) - count) / (time.monotonic() - started)
        for _ in range(failovers):
            fail_over(cluster, swarm, observer, client, figures)
            time.sleep(3)  # train on before the next kill
        updates = int(client.hget(streams.model_key(MODEL, "info"), "updates") or 0)
        wait_until(
            lambda: int(client.hget(streams.model_key(MODEL, "info"), "updates") or 0) > updates,
            "training to go on",
            swarm,
        )
        client.xadd(streams.control, encode_entry(stop_command(), Encoding.MSGPACK))
        wait_until(lambda: swarm.processes["runner"].poll() is not None, "the runner to stop", swarm)
        wait_until(lambda: drained(client, streams, [MODEL]), "the model to drain its streams", swarm)
        figures.crashed = [name for name in swarm.crashed() if name != "runner"]
        _counters(client, streams, figures)
        figures.updates_after = int(client.hget(streams.model_key(MODEL, "info"), "updates") or 0) - updates
        _logs(swarm, figures)
    finally:
        observer.halt.set()
        swarm.stop()
    return figures


def fail_over(
    cluster: LocalCluster, swarm: Swarm, observer: Observer, client: redis.Redis, figures: Figures
) -> None:
    """Kill the swarm's primary; once the loop answers again, count the losses; bring the node back."""
    primary = cluster.master_of(observer.names[0])
    replica = cluster.replica_of(primary)
    if figures.replica_lag_ms:  # a replica behind, as over a slow network: the primary's last writes
        cluster.pause(replica)  # pile up unsent, and die with it
        time.sleep(figures.replica_lag_ms / 1000)
    kill_ms = int(time.time() * 1000)
    cluster.kill(primary)
    dead_ms = int(time.time() * 1000)  # what is stamped later comes from the promoted replica
    cluster.resume(replica)
    cluster.wait_ok()
    wait_until(lambda: observer.newest_logits_ms > dead_ms, "answers after the failover", swarm)
    figures.downtime.append((observer.newest_logits_ms - kill_ms) / 1000)
    losses(observer, client, kill_ms, figures)
    cluster.start_node(primary)  # back, as a replica of its successor
    cluster.wait_ok()  # and in sync
    figures.failovers += 1


def _counters(client: redis.Redis, streams: Streams, figures: Figures) -> None:
    found, wanted = implied_counters(client, streams, MODEL, N_STEPS)
    figures.observations = wanted["observations"]
    figures.counters_exact = found == wanted
    if not figures.counters_exact:
        figures.counter_mismatch = f"{found} != {wanted}"


def _logs(swarm: Swarm, figures: Figures) -> None:
    for line in swarm.lines("model"):
        if line.get("event", "").startswith("the checkpoint is older"):
            figures.commits_rolled_back += line["held_version"] - line["stored_version"]
            figures.transitions_redone += line["held_transitions"] - line["stored_transitions"]
        if line.get("event", "").startswith("commits not acknowledged"):
            figures.unreplicated = max(figures.unreplicated, line["commits"])
    figures.resent = sum(
        line.get("event", "").startswith("redis unavailable for the whole action timeout")
        for line in swarm.lines("runner")
    )


COLUMNS = [
    ("replica behind ms", lambda f: f.replica_lag_ms),
    ("WAIT replicas", lambda f: f"{f.wait_replicas} ({f.wait_timeout_ms} ms)" if f.wait_replicas else 0),
    ("failovers", lambda f: f.failovers),
    ("steps/s before", lambda f: f"{f.steps_per_second:,.0f}"),
    ("downtime s (median)", lambda f: f"{statistics.median(f.downtime):.1f}" if f.downtime else "-"),
    ("observations", lambda f: f"{f.observations:,}"),
    ("obs lost", lambda f: f.observations_lost),
    ("model replies lost", lambda f: f.replies_lost),
    ("answered twice", lambda f: f.answered_twice),
    ("actions lost", lambda f: f.actions_lost),
    ("commits rolled back", lambda f: f.commits_rolled_back),
    ("transitions redone", lambda f: f.transitions_redone),
    ("unreplicated commits", lambda f: f.unreplicated),
    ("steps re-sent", lambda f: f.resent),
    ("counters exact", lambda f: "yes" if f.counters_exact else "NO"),
    ("crashes", lambda f: ", ".join(f.crashed) or "none"),
]


def table(cases: list[Figures]) -> str:
    """The cases as a Markdown table, one row each."""
    rows = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    rows += ["| " + " | ".join(str(cell(f)) for _, cell in COLUMNS) + " |" for f in cases]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failovers", type=int, default=5, help="kills of the swarm's primary per case")
    parser.add_argument("--wait-replicas", type=int, nargs="+", default=[0, 1], help="one case per value")
    parser.add_argument("--n-envs", type=int, default=8, help="the runner's environments")
    parser.add_argument(
        "--replica-lag-ms", type=int, nargs="+", default=[0, 3000],
        help="one case per value: the replica paused this long before each kill (0: a plain kill)",
    )  # fmt: skip
    parser.add_argument("--wait-timeout-ms", type=int, default=5000, help="the model's --wait-timeout-ms")
    args = parser.parse_args()
    cases = []
    with embedded_cluster() as cluster:
        for lag in args.replica_lag_ms:
            for wait in args.wait_replicas:
                case = failover_case(cluster, wait, args.failovers, args.n_envs, lag, args.wait_timeout_ms)
                cases.append(case)
                print(json.dumps(asdict(cases[-1])), flush=True)
    print(table(cases))


if __name__ == "__main__":
    main()

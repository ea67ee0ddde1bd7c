"""Bounded memory over a long run: a worker process's RSS and the stream lengths, every so many entries.

``python -m bench.memory [--n-obs 1000000] [--envs 16] [--report-every 100000] [--stream-maxlen 10000]
[--bad-every 50] [--evolution-every 5000] [--rotate-envs 0] [--redis-url URL] [-- worker options]``

Starts a private ``redis-server`` (or uses ``--redis-url``/``REDIS_URL``) and one model worker
process (``python -m worker model --stream-maxlen M``; options after ``--`` are passed on), then
publishes ``--n-obs`` observations of ``--envs`` environments in the environment runner's format
(chained REWARD/ACTION, episode ends), one malformed entry every ``--bad-every`` observations, and a
GET plus a SET every ``--evolution-every``. Like the environment runner it trims what it writes
(``MAXLEN ~`` the same bound), and it keeps at most a few batches outstanding, so the worker is
never idle and Redis never holds a backlog.

Every ``--report-every`` answered observations it prints the worker's resident set size (RSS;
psutil if installed, else ``/proc/<pid>/status``) and its peak, Redis's ``used_memory``, the length
of every stream, and the number of environments in the worker's memory hash. At the end: RSS after
warm-up (the first report) against the last, and the longest each stream got.

``--rotate-envs N`` renames the environments every N rounds (environment runners that come and go
with new ENV_IDs): the worker's memory then holds every environment heard of in the last
``--memory-ttl`` seconds (a worker option: ``-- --memory-ttl 2``; default an hour), and forgets the
others.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from worker.common.servers import embedded_redis
from worker.protocol import Encoding, Streams, encode_entry

COMPONENT = "mem-1"
N_PARAMS = 755  # CartPole-v1 with the default net_arch


def rss_kib(pid: int) -> tuple[int, int]:
    """Resident set size and its peak (KiB) of process ``pid``."""
    try:
        import psutil  # optional

        info = psutil.Process(pid).memory_info()
        return info.rss // 1024, getattr(info, "peak_wset", info.rss) // 1024
    except ImportError:
        pass
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Sample:
    answered: int
    seconds: float
    rss: int  # KiB
    peak: int  # KiB
    redis_used: int  # bytes
    lengths: dict[str, int]
    envs: int

    @staticmethod
    def header(names) -> str:
        head = f"{'answered':>9} {'s':>7} {'obs/s':>6} {'RSS MiB':>8} {'peak':>6} {'redis MiB':>9}"
        return head + "".join(f" {n:>11}" for n in names) + f" {'envs':>6}"

    def row(self) -> str:
        rate = self.answered / self.seconds if self.seconds else 0.0
        head = f"{self.answered:>9} {self.seconds:>7.1f} {rate:>6.0f} {self.rss / 1024:>8.1f}"
        head += f" {self.peak / 1024:>6.1f} {self.redis_used / 2**20:>9.1f}"
        return head + "".join(f" {n:>11}" for n in self.lengths.values()) + f" {self.envs:>6}"


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    longest: dict[str, int] = field(default_factory=dict)


def start_worker(url: str, prefix: str, maxlen: int, extra: list[str], log) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "worker", "model", "--redis-url", url, "--prefix", prefix,
        "--component-id", COMPONENT, "--seed", "0", "--stream-maxlen", str(maxlen), "--log-level", "error",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def answered(client: redis.Redis, streams: Streams) -> int:
    try:
        return int(client.xinfo_stream(streams.logits)["entries-added"])
    except redis.ResponseError:  # not created yet
        return 0


def run(url: str, args: argparse.Namespace, extra: list[str]) -> Run:
    client = redis.Redis.from_url(url)
    streams = Streams(args.prefix)
    names = {
        "observation": streams.observation,
        "evolution": streams.evolution,
        "logits": streams.logits,
        "weights": streams.weights,
        "dead": streams.dead,
    }
    for key in client.scan_iter(f"{args.prefix}:*"):
        client.delete(key)
    rng = np.random.default_rng(args.seed)
    result = Run(longest=dict.fromkeys(names, 0))
    window = 4 * 256  # outstanding observations: a few of the worker's batches
    with tempfile.TemporaryFile() as log:
        proc = start_worker(url, args.prefix, args.stream_maxlen, extra, log)
        try:
            deadline = time.monotonic() + 120
            while not client.exists(streams.model_key(COMPONENT, "info")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"the worker did not start: {log.read().decode(errors='replace')}")
                time.sleep(0.05)
            started, published, rnd, next_report = time.monotonic(), 0, 0, args.report_every
            print(Sample.header(names), flush=True)
            while published < args.n_obs:
                with client.pipeline(transaction=False) as pipe:
                    for _ in range(max(1, 256 // args.envs)):  # about one worker batch per pipeline
                        generation = rnd // args.rotate_envs if args.rotate_envs else 0
                        for k in range(args.envs):
                            message = {
                                "OBSERVATION": rng.normal(0, 0.5, 4).tolist(),
                                "ENV_ID": f"g{generation}-e{k}",
                            }
                            if rnd and not (args.rotate_envs and rnd % args.rotate_envs == 0):
                                message |= {"REWARD": 1.0, "ACTION": int(rng.integers(2))}
                                if rng.random() < 0.02:
                                    message["DONE"] = True
                            encoding = Encoding.MSGPACK if k % 2 else Encoding.JSON
                            fields = encode_entry(message, encoding)
                            pipe.xadd(
                                streams.observation, fields, maxlen=args.stream_maxlen, approximate=True
                            )
                            published += 1
                            if args.bad_every and published % args.bad_every == 0:
                                bad = {"OBSERVATION": b"[1, 2]", "ENV_ID": f"g{generation}-e{k}"}
                                pipe.xadd(
                                    streams.observation, bad, maxlen=args.stream_maxlen, approximate=True
                                )
                            if args.evolution_every and published % args.evolution_every == 0:
                                vector = rng.normal(0, 0.1, N_PARAMS).astype("<f4").tobytes()
                                for command in (
                                    {"CMD": "GET"},
                                    {"CMD": "SET", "WEIGHTS": {COMPONENT: vector}},
                                ):
                                    fields = encode_entry(command, Encoding.MSGPACK)
                                    pipe.xadd(streams.evolution, fields, maxlen=1000, approximate=True)
                        rnd += 1
                    pipe.execute()
                while published - answered(client, streams) > window:
                    if proc.poll() is not None:
                        raise SystemExit(f"the worker died (exit status {proc.returncode})")
                    time.sleep(0.002)
                done = answered(client, streams)
                for name, stream in names.items():
                    result.longest[name] = max(result.longest[name], client.xlen(stream))
                if done >= next_report or published >= args.n_obs:
                    if published >= args.n_obs:
                        while answered(client, streams) < published and proc.poll() is None:
                            time.sleep(0.01)
                        done = answered(client, streams)
                    next_report += args.report_every
                    rss, peak = rss_kib(proc.pid)
                    sample = Sample(
                        answered=done,
                        seconds=time.monotonic() - started,
                        rss=rss,
                        peak=peak,
                        redis_used=int(client.info("memory")["used_memory"]),
                        lengths={n: client.xlen(s) for n, s in names.items()},
                        envs=client.hlen(streams.model_key(COMPONENT, "memory")),
                    )
                    result.samples.append(sample)
                    print(sample.row(), flush=True)
            if proc.poll() is not None:
                raise SystemExit(f"the worker died (exit status {proc.returncode})")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    client.close()
    return result


def summary(result: Run, maxlen: int) -> str:
    first, last = result.samples[0], result.samples[-1]
    lines = [
        f"worker RSS: {first.rss / 1024:.1f} MiB after {first.answered} observations (warm-up),"
        f" {last.rss / 1024:.1f} MiB after {last.answered} ({(last.rss - first.rss) / 1024:+.1f} MiB);"
        f" highest sample {max(s.rss for s in result.samples) / 1024:.1f} MiB,"
        f" peak (VmHWM) {last.peak / 1024:.1f} MiB",
        f"redis used_memory: {first.redis_used / 2**20:.1f} MiB -> {last.redis_used / 2**20:.1f} MiB",
        "longest streams (bound ~"
        + str(maxlen)
        + "): "
        + ", ".join(f"{name} {length}" for name, length in result.longest.items()),
        f"environments in the worker's memory: {last.envs}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--n-obs", type=int, default=1_000_000, help="observations to publish")
    parser.add_argument("--envs", type=int, default=16, help="environments interleaved")
    parser.add_argument(
        "--report-every", type=int, default=100_000, help="answered observations between reports"
    )
    parser.add_argument("--stream-maxlen", type=int, default=10_000, help="MAXLEN ~ of every stream")
    parser.add_argument(
        "--bad-every", type=int, default=50, help="a malformed entry every N observations (0: none)"
    )
    parser.add_argument("--evolution-every", type=int, default=5_000, help="GET and SET every N observations")
    parser.add_argument("--rotate-envs", type=int, default=0, help="new ENV_IDs every N rounds (0: never)")
    parser.add_argument("--prefix", default="mem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: a private redis-server"
    )
    args = parser.parse_args(argv)
    if args.redis_url:
        result = run(args.redis_url, args, extra)
    else:
        with embedded_redis() as url:
            result = run(url, args, extra)
    print(summary(result, args.stream_maxlen))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Saturated throughput of the model worker against the tutorial's one-message-at-a-time handler.

``python -m bench.throughput [--cases vector image] [--n-obs N] [--tutorial-n-obs M] [--envs 64]
[--encoding json|msgpack|both] [--batch-size B] [--tutorial-torch-threads T] [--profile]
[--image-n-obs I] [--image-json-n-obs J] [--image-torch-threads T]``

One run starts a private ``redis-server`` (:func:`worker.common.servers.embedded_redis`) and, for every
encoding and every contender (:mod:`bench.tutorial_port`, then the real
:class:`worker.model.loop.ModelWorker` in-process with its default settings and a component ID):

1. creates the contender's consumer group on a fresh key prefix (groups start at ``$``);
2. pre-fills ``<prefix>:observation`` with N observations of ``--envs`` CartPole-v1 environments
   (random actions) interleaved round-robin, in the environment runner's message format: the first
   observation of an environment without REWARD, then REWARD/ACTION, DONE when an episode ended;
3. times the contender from the start of consumption until all N are answered on
   ``<prefix>:logits``, then checks that there are exactly N replies and nothing left pending.

It prints a markdown table (speed-up relative to the tutorial port of the same encoding) and the
counters of each worker run, which show that it trained while answering. ``--profile`` runs the
worker contenders under cProfile and prints their hot spots; ``--batch-size`` overrides the worker's.

Then, in the same run and on the same server, the image case (:mod:`bench.throughput_image`; skip it
with ``--cases vector``, or run it alone with ``--cases image``): the worker alone (the tutorial
handles vectors only) on 84x84x3 uint8 observations, given its spaces as JSON so that it picks
SB3's CnnPolicy, as binary arrays in msgpack entries (``--image-n-obs``) and as JSON lists
(``--image-json-n-obs``, fewer: they parse much more slowly); ``--encoding`` selects these too. A
second table gives obs/s and bytes per observation entry of every worker run, vector and image.

Each contender runs with its own torch thread count: the tutorial port with torch's default (the
tutorial sets none; on a small machine that is also its fastest), the worker with its
``torch_threads`` setting (1 by default). ``ModelSettings`` also reads environment variables, so
e.g. ``BATCH_SIZE`` or ``TORCH_THREADS`` in the environment change the worker's "defaults".
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import pstats
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import redis
import torch

from bench import tutorial_port
from worker.common import logs
from worker.common.connections import connect
from worker.common.servers import embedded_redis
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.protocol import Encoding, Streams, encode_entry

PREFILL_CHUNK = 2_000


@dataclass
class Result:
    contender: str
    encoding: Encoding
    observations: int
    seconds: float
    details: dict[str, int] = field(default_factory=dict)
    case: str = "vector"  # or "image" (bench.throughput_image)
    entry_bytes: int = 0  # mean bytes of an observation entry's fields and values

    @property
    def rate(self) -> float:
        return self.observations / self.seconds


# --------------------------------------------------------------------------- workload


def observations(n: int, n_envs: int, seed: int = 0) -> list[dict]:
    """``n`` messages of ``n_envs`` CartPole-v1 environments stepped with random actions, round-robin.

    Each message is what :mod:`worker.env.runner` would publish: the first of an environment has no
    REWARD; later ones carry the REWARD and ACTION of the step that led to them, ``DONE: true`` when
    that step ended the episode (the observation is then the reset one), and for a time-limit
    truncation ``TRUNCATED`` and ``TERMINAL_OBSERVATION``.
    """
    rng = np.random.default_rng(seed)
    envs = [gym.make("CartPole-v1") for _ in range(n_envs)]
    pending: list[dict] = []
    for k, env in enumerate(envs):
        obs, _ = env.reset(seed=seed + k)
        pending.append({"OBSERVATION": obs.astype(np.float64).tolist()})
    messages: list[dict] = []
    while len(messages) < n:
        for k, env in enumerate(envs):
            if len(messages) == n:
                break
            message = {**pending[k], "ENV_ID": f"env-{k}", "DETERMINISTIC": False}
            messages.append(message)
            action = int(rng.integers(2))
            obs, reward, terminated, truncated, _ = env.step(action)
            following: dict = {}
            if terminated or truncated:
                following["DONE"] = True
                if truncated and not terminated:
                    following.update(TRUNCATED=True, TERMINAL_OBSERVATION=obs.astype(np.float64).tolist())
                obs, _ = env.reset()
            following.update(OBSERVATION=obs.astype(np.float64).tolist(), REWARD=float(reward), ACTION=action)
            pending[k] = following
    for env in envs:
        env.close()
    return messages


def prefill(client: redis.Redis, stream: str, messages: Iterable[dict], encoding: Encoding) -> int:
    """XADD every message (pipelined, untimed), as the environment runners would have published them;
    return the bytes of all the entries' fields and values."""
    total = 0
    chunks = iter(messages)
    while chunk := list(itertools.islice(chunks, PREFILL_CHUNK)):
        with client.pipeline(transaction=False) as pipe:
            for message in chunk:
                entry = encode_entry(message, encoding)
                total += sum(len(k) + len(v) for k, v in entry.items())
                pipe.xadd(stream, entry)
            pipe.execute()
    return total


def check_replies(
    client: redis.Redis, streams: Streams, group: str, n: int, contender: str, n_logits: int = 2
) -> None:
    """Exactly ``n`` logits replies, the last one of ``n_logits`` logits, and nothing pending in ``group``."""
    replies = client.xlen(streams.logits)
    pending = client.xpending(streams.observation, group)["pending"]
    if replies != n or pending:
        raise SystemExit(f"{contender}: {replies} logits replies for {n} observations, {pending} pending")
    [(_, fields)] = client.xrevrange(streams.logits, count=1)
    logits = (
        msgpack.unpackb(fields[b"data"])["LOGITS"] if b"data" in fields else json.loads(fields[b"LOGITS"])
    )
    if len(logits) != n_logits:
        raise SystemExit(f"{contender}: malformed reply {fields!r}")


# --------------------------------------------------------------------------- contenders


def run_tutorial(url: str, messages: list[dict], encoding: Encoding, torch_threads: int) -> Result:
    torch.set_num_threads(torch_threads)  # process-wide: a ModelWorker sets its own in __init__
    client = connect(url)
    client.flushdb()
    streams = Streams(f"bench-tutorial-{encoding.value}")
    model = tutorial_port.TutorialModel()
    tutorial_port.create_group(client, streams, model)
    prefill(client, streams.observation, messages, encoding)
    start = time.perf_counter()
    answered = tutorial_port.serve(client, streams, model, len(messages))
    seconds = time.perf_counter() - start
    if answered != len(messages):
        raise SystemExit(f"tutorial port answered {answered} of {len(messages)}")
    check_replies(client, streams, tutorial_port.group_name(model), len(messages), "tutorial port")
    client.close()
    details = {"trainings": model.trainings, "torch_threads": torch.get_num_threads()}
    return Result("tutorial port", encoding, len(messages), seconds, details)


def run_worker(
    url: str,
    messages: list[dict],
    encoding: Encoding,
    profiler: cProfile.Profile | None = None,
    batch_size: int | None = None,
) -> Result:
    settings = worker_settings(url, f"bench-worker-{encoding.value}", f"bench-{encoding.value}", batch_size)
    n = len(messages)
    seconds, details, entry_bytes = serve_worker(
        url, settings, n, lambda client, stream: prefill(client, stream, messages, encoding), profiler
    )
    return Result("ModelWorker", encoding, n, seconds, details, entry_bytes=entry_bytes)


def worker_settings(
    url: str, prefix: str, component_id: str, batch_size: int | None = None, **overrides: Any
) -> ModelSettings:
    """The worker's default settings (and environment variables), but for these."""
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    return ModelSettings(
        _cli_parse_args=False, redis_url=url, prefix=prefix, component_id=component_id, **overrides
    )


def serve_worker(
    url: str,
    settings: ModelSettings,
    n: int,
    fill: Callable[[redis.Redis, str], int],
    profiler: cProfile.Profile | None = None,
    n_logits: int = 2,
) -> tuple[float, dict[str, int], int]:
    """Start a :class:`ModelWorker` on a flushed database, ``fill`` its observation stream with ``n``
    entries (untimed; it returns their bytes), time it until all are answered, check the replies;
    return the seconds, the worker's counters and the mean bytes per entry."""
    client = connect(url)
    client.flushdb()
    if n > settings.stream_maxlen:
        raise SystemExit(f"{n} observations exceed the worker's stream_maxlen {settings.stream_maxlen}")
    worker = ModelWorker(settings, client)
    worker.start()  # groups at '$', lease, first checkpoint
    filled = fill(client, worker.streams.observation)
    deadline = time.monotonic() + 600
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    while worker.counters.observations < n:
        if worker.poll() == 0 and time.monotonic() > deadline:
            raise SystemExit(f"worker answered {worker.counters.observations} of {n}")
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    check_replies(client, worker.streams, worker.group, n, "worker", n_logits)
    worker.shutdown()
    client.close()
    c = worker.counters
    details = {
        "updates": c.updates,
        "segments": c.segments,
        "transitions": c.transitions,
        "dropped": c.dropped,
        "commits": c.version,
        "dead": c.dead,
        "batch_size": settings.batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    return seconds, details, round(filled / n) if n else 0


# --------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    baseline = {r.encoding: r.rate for r in results if r.contender == "tutorial port"}
    lines = [
        "| contender | encoding | observations | seconds | obs/s | speed-up vs tutorial port |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        speedup = f"{r.rate / baseline[r.encoding]:.1f}x" if r.encoding in baseline else "-"
        lines.append(
            f"| {r.contender} | {r.encoding.value} | {r.observations:,} | {r.seconds:.2f} "
            f"| {r.rate:,.0f} | {speedup} |"
        )
    return "\n".join(lines)


def progress(result: Result) -> None:
    print(
        f"{label(result)}: {result.observations:,} obs in {result.seconds:.2f}s,"
        f" {result.rate:,.0f} obs/s, {result.details}",
        file=sys.stderr,
    )


def hot_spots(profiler: cProfile.Profile, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    for key in ("tottime", "cumulative"):
        out.write(f"\n--- top {limit} by {key} ---\n")
        stats.sort_stats(key).print_stats(limit)
    return out.getvalue()


def label(result: Result) -> str:
    case = "" if result.case == "vector" else f"{result.case}, "
    return f"{result.contender} ({case}{result.encoding.value})"


def main(argv: list[str] | None = None) -> int:
    from bench import throughput_image  # imports this module: not at the top, where it would be circular

    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["vector", "image"],
        default=["vector", "image"],
        help="vector: CartPole-v1 against the tutorial port; image: 84x84x3 uint8 (default: both)",
    )
    parser.add_argument("--n-obs", type=int, default=50_000, help="observations for the worker")
    parser.add_argument(
        "--tutorial-n-obs", type=int, default=5_000, help="observations for the tutorial port"
    )
    parser.add_argument("--envs", type=int, default=64, help="interleaved environments")
    parser.add_argument("--encoding", choices=["json", "msgpack", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tutorial-torch-threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of the tutorial port (default: torch's own default, as in the tutorial;"
        " the worker sets its own torch_threads setting, 1 by default)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="the worker's batch_size (default: its own default)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the worker runs")
    parser.add_argument("--profile-lines", type=int, default=30)
    throughput_image.add_arguments(parser)
    args = parser.parse_args(argv)

    logs.configure("warning")
    encodings = [Encoding.JSON, Encoding.MSGPACK] if args.encoding == "both" else [Encoding(args.encoding)]
    messages: list[dict] = []
    if "vector" in args.cases:
        generated = time.perf_counter()
        messages = observations(max(args.n_obs, args.tutorial_n_obs), args.envs, args.seed)
        dones = sum("DONE" in m for m in messages)
        print(
            f"workload: {len(messages):,} CartPole-v1 observations from {args.envs} interleaved environments,"
            f" {dones:,} episode ends (generated in {time.perf_counter() - generated:.1f}s)",
            file=sys.stderr,
        )
    profiler = cProfile.Profile() if args.profile else None
    results: list[Result] = []
    images: list[Result] = []
    with embedded_redis() as url:
        for encoding in encodings if "vector" in args.cases else []:
            tutorial_messages = messages[: args.tutorial_n_obs]
            results.append(run_tutorial(url, tutorial_messages, encoding, args.tutorial_torch_threads))
            progress(results[-1])
            results.append(run_worker(url, messages[: args.n_obs], encoding, profiler, args.batch_size))
            progress(results[-1])
        if "image" in args.cases:
            images = throughput_image.run_all(url, args, encodings, profiler, progress)
    if results:
        print(table(results))
        print()
        for r in results:
            counts = ", ".join(f"{k} {v:,}" for k, v in r.details.items())
            print(f"- {r.contender} ({r.encoding.value}): {counts}")
    if images:
        if results:
            print()
        print(throughput_image.table(results + images))
        print()
        for r in images:
            counts = ", ".join(f"{k} {v:,}" for k, v in r.details.items())
            print(f"- {label(r)}: {counts}")
    if profiler is not None:
        print(hot_spots(profiler, args.profile_lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

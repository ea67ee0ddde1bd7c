"""The image case of :mod:`bench.throughput`: a model worker's throughput on 84x84x3 uint8 observations.

The worker is given its spaces as JSON (``gym_env="none"``, :data:`SPACES`), so it picks SB3's
``CnnPolicy`` (NatureCNN) by itself, and otherwise runs with its default settings, as in the vector
case (a batch of 256 JSON images takes longer than the default 5 s lease: the commit takes back a
lease that expired with no successor, so it goes through). Its observation stream is
pre-filled with ``--image-n-obs`` observations of ``--envs`` environments interleaved round-robin,
in the environment runner's message format (the first observation of an environment without
REWARD, then REWARD/ACTION, DONE when an episode ended): random images from a fixed seed, random
actions of 4, a reward of 1 per step and episodes ending with probability 1/22 per step
(CartPole-v1's mean length under random actions).

Each image travels in two forms, the same images in both:

- msgpack entries, the image as a binary array ``{"dtype": "uint8", "shape": [84, 84, 3], "data":
  <bin>}`` (:func:`worker.protocol.values.binary`), about 21 KB per entry;
- JSON entries, the image as nested lists of numbers (about 90 KB per entry: 2.6 digits, a comma
  and brackets per value), much slower to parse, hence fewer of them (``--image-json-n-obs``).

There is no tutorial port to compare with (the tutorial handles vectors only): the report gives the
worker's obs/s and bytes per entry next to the vector case's, and its counters (the A2C updates show
that it trained, a CNN forward and backward per update, while answering).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bench.throughput import Result, prefill, serve_worker, worker_settings
from worker.protocol import Encoding, Spaces
from worker.protocol.values import wire_value

IMAGE_SHAPE = (84, 84, 3)
N_ACTIONS = 4
MEAN_EPISODE = 22  # steps; episodes end with probability 1/MEAN_EPISODE per step
SPACES = json.dumps(
    {
        "observation": {"type": "Box", "shape": list(IMAGE_SHAPE), "dtype": "uint8", "low": 0, "high": 255},
        "action": {"type": "Discrete", "n": N_ACTIONS},
    }
)
# Defaults sized for about 30-60 s of image case, pre-fills included, on a 2-core machine (torch_threads
# 1): 1.3-1.8 s per batch of 256 binary images (one forward, one A2C update of the CNN, one commit:
# about 160-200 obs/s), 20-40 ms to parse each JSON image and as much to make it (about 25 obs/s).
IMAGE_N_OBS = 4_096
IMAGE_JSON_N_OBS = 384
WIRE = {Encoding.MSGPACK: "binary array (msgpack bin)", Encoding.JSON: "nested lists (JSON)"}


def image_messages(n: int, n_envs: int, seed: int, binary_arrays: bool) -> Iterator[dict[str, Any]]:
    """``n`` messages of ``n_envs`` image environments, round-robin, generated as they are consumed.

    The same ``seed`` gives the same images, actions and episode ends in either form.
    """
    space = Spaces.from_json(SPACES).observation
    rng = np.random.default_rng(seed)

    def image() -> Any:
        return wire_value(rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8), space, binary_arrays)

    pending: list[dict[str, Any]] = [{"OBSERVATION": image()} for _ in range(n_envs)]
    produced = 0
    while produced < n:
        for k in range(n_envs):
            if produced == n:
                return
            yield {**pending[k], "ENV_ID": f"env-{k}", "DETERMINISTIC": False}
            produced += 1
            action = int(rng.integers(N_ACTIONS))
            following: dict[str, Any] = {"DONE": True} if rng.random() < 1 / MEAN_EPISODE else {}
            following.update(OBSERVATION=image(), REWARD=1.0, ACTION=action)
            pending[k] = following


def run_image(
    url: str,
    n: int,
    n_envs: int,
    encoding: Encoding,
    seed: int = 0,
    profiler: cProfile.Profile | None = None,
    batch_size: int | None = None,
    torch_threads: int | None = None,
) -> Result:
    """The worker on ``n`` image observations: binary arrays in msgpack entries, lists in JSON ones."""
    overrides: dict[str, Any] = {"gym_env": "none", "spaces": SPACES}
    if torch_threads is not None:
        overrides["torch_threads"] = torch_threads
    name = f"image-{encoding.value}"
    settings = worker_settings(url, f"bench-worker-{name}", f"bench-{name}", batch_size, **overrides)
    binary_arrays = encoding is Encoding.MSGPACK
    messages = image_messages(n, n_envs, seed, binary_arrays)
    seconds, details, entry_bytes = serve_worker(
        url,
        settings,
        n,
        lambda client, stream: prefill(client, stream, messages, encoding),
        profiler,
        n_logits=N_ACTIONS,
    )
    return Result("ModelWorker", encoding, n, seconds, details, case="image", entry_bytes=entry_bytes)


# --------------------------------------------------------------------------- command line and report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image case")
    group.add_argument(
        "--image-n-obs",
        type=int,
        default=IMAGE_N_OBS,
        help="image observations for the worker, as binary arrays in msgpack entries",
    )
    group.add_argument(
        "--image-json-n-obs",
        type=int,
        default=IMAGE_JSON_N_OBS,
        help="image observations for the worker as JSON lists (fewer: they parse much more slowly)",
    )
    group.add_argument(
        "--image-torch-threads",
        type=int,
        default=None,
        help="the image worker's torch_threads (default: its own default)",
    )


def run_all(
    url: str,
    args: argparse.Namespace,
    encodings: list[Encoding],
    profiler: cProfile.Profile | None,
    progress: Callable[[Result], None],
) -> list[Result]:
    """The image case in every encoding of ``encodings`` (msgpack first, the main case)."""
    counts = {Encoding.MSGPACK: args.image_n_obs, Encoding.JSON: args.image_json_n_obs}
    plan = [(e, counts[e]) for e in (Encoding.MSGPACK, Encoding.JSON) if e in encodings and counts[e] > 0]
    described = ", ".join(f"{n:,} as {WIRE[e]}" for e, n in plan)
    print(
        f"workload (image): {'x'.join(map(str, IMAGE_SHAPE))} uint8 random images of {args.envs}"
        f" interleaved environments, {N_ACTIONS} actions, seed {args.seed}: {described}",
        file=sys.stderr,
    )
    results: list[Result] = []
    for encoding, n in plan:
        started = time.perf_counter()
        threads = args.image_torch_threads
        results.append(run_image(url, n, args.envs, encoding, args.seed, profiler, args.batch_size, threads))
        progress(results[-1])
        spent = time.perf_counter() - started
        print(f"  (image, {encoding.value}: {spent:.1f}s with the pre-fill)", file=sys.stderr)
    return results


def observation_kind(result: Result) -> str:
    if result.case == "image":
        return f"{'x'.join(map(str, IMAGE_SHAPE))} uint8 image, {WIRE[result.encoding]}"
    return "CartPole-v1, 4 numbers as a list"


def table(results: list[Result]) -> str:
    """Every worker run, vector and image, with the bytes of one observation entry."""
    lines = [
        "| case | observation | encoding | observations | seconds | obs/s | bytes per entry |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.contender != "ModelWorker":
            continue
        lines.append(
            f"| {r.case} | {observation_kind(r)} | {r.encoding.value} | {r.observations:,}"
            f" | {r.seconds:.2f} | {r.rate:,.0f} | {r.entry_bytes:,} |"
        )
    return "\n".join(lines)

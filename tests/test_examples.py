"""The examples of examples/ as a user runs them: processes of their own, against a real model
worker and the aggregator (stepping in this process) on a real redis-server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components import aggregator, model, running

ROOT = Path(__file__).resolve().parent.parent
EPISODE = re.compile(r"^episode (\d+): return (\d+)$", re.M)
MEAN = re.compile(r"^(\d+) episodes on (\d+) environments: mean return (\d+\.\d)$", re.M)

pytestmark = [pytest.mark.redis_server, pytest.mark.slow]


def run_example(name: str, url: str, *args: str) -> str:
    """Run ``examples/<name>`` to its end; its output (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--redis-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_examples_act_through_a_model_and_the_aggregator(real_redis, settings) -> None:
    url = settings.redis_url
    worker = model(settings)  # publishes its weights for local clients (--publish-weights-every 1)
    with running(worker, aggregator(url)):
        for mode in ("ensemble", "direct", "local"):
            chosen = ["--mode", mode] + ([] if mode == "ensemble" else ["--model", "m1"])
            output = run_example("own_process.py", url, "--episodes", "2", *chosen)
            episodes = EPISODE.findall(output)
            assert [int(n) for n, _ in episodes] == [1, 2], output
            assert all(int(r) >= 1 for _, r in episodes), output
        output = run_example("asyncio_envs.py", url, "--envs", "8", "--episodes", "2")
    [(count, envs, mean)] = MEAN.findall(output)
    assert (int(count), int(envs)) == (16, 8) and float(mean) >= 1, output
    assert worker.counters.transitions > 0  # the models learned from the examples' steps

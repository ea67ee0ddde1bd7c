"""Runner processes (``python -m worker env --stepping async``) serving a real model and aggregator:
two runners with their own IDs in one ``control train`` round, and a runner SIGKILLed mid-episode,
restarted with its ID, running the interrupted run again to its report."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import components
from tests.chains import answered_once, delivered, learned_once
from tests.faults.chaos.checks import drained
from tests.helpers import read
from worker.control.train import run_episodes
from worker.protocol import Streams

pytestmark = [pytest.mark.slow, pytest.mark.redis_server]

ROOT = Path(__file__).resolve().parents[1]


def runner_command(url: str, runner_id: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker", "env", "--redis-url", url, "--prefix", "rl", "--runner-id", runner_id,
        "--seed", "0", "--block-ms", "100", "--no-trim-replies", "--action-timeout", "20", *extra,
    ]  # fmt: skip


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(client: redis.Redis, runner_id: str, since: float, process: subprocess.Popen) -> None:
    """Until the runner said it is ready after ``since`` (unix seconds): a RUN before is not its."""
    deadline = time.monotonic() + 60
    while (ready := client.hget(f"rl:runner:{runner_id}", "ready")) is None or float(ready) < since:
        assert process.poll() is None, f"runner {runner_id} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"runner {runner_id} not ready"
        time.sleep(0.05)


def wait_drained(client: redis.Redis, models: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not drained(client, Streams("rl"), models):
        assert time.monotonic() < deadline, "the models did not drain"
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


@contextmanager
def swarm(settings: Any, url: str) -> Iterator[None]:
    """One model and the aggregator, stepping in this process's threads."""
    with components.running(components.model(settings, "m1"), components.aggregator(url)):
        yield


def run_reports(client: redis.Redis) -> list[dict[str, Any]]:
    return [m for _, m in read(client, "rl:status") if m["EVENT"] == "run"]


def test_two_runner_processes_serve_one_swarm_in_one_control_train_round(
    real_redis, settings, redis_server_url, tmp_path
) -> None:
    url = redis_server_url
    with swarm(settings, url):
        since = time.time()
        runners = {
            runner_id: start(
                runner_command(url, runner_id, "--n-envs", str(n_envs), "--stepping", "async"),
                tmp_path / f"{runner_id}.log",
            )
            for runner_id, n_envs in (("left", 3), ("right", 5))
        }
        for runner_id, process in runners.items():
            wait_ready(real_redis, runner_id, since, process)
        control = subprocess.run(
            [
                sys.executable,
                "-m",
                "worker",
                "control",
                "train",
                "--redis-url",
                url,
                "--prefix",
                "rl",
                "--runners",
                "2",
                "--rounds",
                "1",
                "--steps",
                "300",
                "--eval-episodes",
                "4",
                "--no-progress",
                "--no-evolve",
                "--run-timeout",
                "120",
            ],  # fmt: skip
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert control.returncode == 0, control.stderr[-3000:]
        assert all(stop(process) == 0 for process in runners.values())
        wait_drained(real_redis, ["m1"])

    assert "| 1 | 600 |" in control.stdout, control.stdout  # 300 steps of each runner
    reports = run_reports(real_redis)
    assert sorted((r["RUNNER_ID"], "ERROR" in r) for r in reports) == [
        ("left", False),
        ("left", False),
        ("right", False),
        ("right", False),
    ]
    training = [r for r in reports if len(r["RETURNS"]) != 4]
    assert [r["STEPS"] for r in training] == [300, 300]
    for runner_id, n_envs in (("left", 3), ("right", 5)):
        observations, actions = answered_once(real_redis, runner_id)
        moved = delivered(observations, actions)
        assert {env for env in moved if "-eval-" not in env} == {f"{runner_id}-{k}" for k in range(n_envs)}
        assert any("-eval-" in env for env in moved)
    learned_once(real_redis, ["m1"], settings.n_steps)


def test_an_async_runner_killed_mid_episode_runs_the_run_again(
    real_redis, settings, redis_server_url, tmp_path
) -> None:
    url, client = redis_server_url, redis.Redis.from_url(redis_server_url)
    command = runner_command(url, "k", "--n-envs", "4", "--stepping", "async", "--log-json")
    result: dict[str, Any] = {}
    with swarm(settings, url):
        since = time.time()
        first = start(command, tmp_path / "runner.log")
        wait_ready(real_redis, "k", since, first)

        def drive() -> None:
            try:
                result.update(run_episodes(client, Streams("rl"), steps=600, runners=1, timeout=180))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                result["error"] = exc

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        deadline = time.monotonic() + 60
        while real_redis.xlen("rl:observation") < 150:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = read(real_redis, "rl:observation")
        since = time.time()
        second = start(command, tmp_path / "runner.log")
        wait_ready(real_redis, "k", since, second)
        driver.join(180)
        assert stop(second) == 0
        wait_drained(real_redis, ["m1"])

    assert "error" not in result, result.get("error")
    assert result["steps"] == 600  # the second attempt ran the whole run
    [report] = run_reports(real_redis)  # one report: the killed attempt left none
    assert "ERROR" not in report and report["STEPS"] == 600
    last = {m["ENV_ID"]: m for _, m in before}
    assert any("REWARD" in m and not m.get("DONE") for m in last.values())  # killed mid-episode
    observations, actions = answered_once(real_redis, "k")  # the dead runner's steps answered too
    assert len(observations) == len(before) + 600
    restarted = {m["ENV_ID"]: m for _, m in reversed(observations[len(before) :])}
    assert all("REWARD" not in m for m in restarted.values())  # each chain starts afresh
    delivered(observations, actions)
    learned_once(real_redis, ["m1"], settings.n_steps)
    assert '"resumed": "' in (tmp_path / "runner.log").read_text()  # read on after the last finished

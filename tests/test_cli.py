"""The command line: what a user can mend is one line on stderr, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from worker.cli import main
from worker.common.servers import free_port


def test_control_alone_prints_the_usage_and_runs_nothing(capsys) -> None:
    assert main(["control"]) == 2  # it used to start `control train`, waiting for models
    err = capsys.readouterr().err
    assert "control train" in err and "control status" in err
    assert main(["control", "--help"]) == 0 and "control forget" in capsys.readouterr().out


VECTOR_SPACES = '{"observation": {"type": "Box", "shape": [4]}, "action": {"type": "Discrete", "n": 2}}'


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["model", "--gym-env", "Foo-v0"], "Environment `Foo` doesn't exist"),
        (["model", "--gym-env", "Blackjack-v1"], "observation space Tuple(Discrete(32)"),
        (["model", "--gym-env", "none"], "give --spaces, or --obs-shape and --n-actions"),
        (["model", "--spaces", '{"observation": {"type": "Box"}}'], "not a description of spaces"),
        (["model", "--spaces", VECTOR_SPACES, "--policy", "CnnPolicy"], "CnnPolicy needs an image"),
        (["model", "--spaces", VECTOR_SPACES, "--policy", "MultiInputPolicy"], "does not fit"),
        (
            ["env", "--gym-env", "Blackjack-v1"],
            "is not one of Discrete, Box, MultiDiscrete",
        ),
    ],
)
def test_an_unusable_environment_is_one_line(args: list[str], says: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # never reached: the component cannot be built
    extra = ["--component-id", "m1"] if args[0] == "model" else []
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--redis-url", url, *extra])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["model", "--net-arch", "{pi:[16]}"], "error: Parsing error encountered for net_arch"),
        (["control", "status", "--redis-url", "http://localhost"], "error: --redis-url: Value error, Redis"),
        (["model", "--redis-url", "redis://localhost:abc/0"], "error: --redis-url: Value error, Port"),
        (["demo", "--redis-url", "http://localhost"], "error: --redis-url: Value error, Redis"),
    ],
)
def test_a_malformed_flag_is_one_line(capsys, args: list[str], says: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1


def test_a_tool_facing_no_redis_says_so_in_one_line(capsys) -> None:
    port = free_port()
    assert main(["control", "status", "--redis-url", f"redis://user:secret@127.0.0.1:{port}/0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Redis at redis://user:***@127.0.0.1:{port}/0 is unreachable")
    assert "secret" not in err


def test_status_into_a_closed_pipe_exits_without_a_traceback(redis_server_url: str) -> None:
    """``control status | head -1``: the reader leaves early; the writer stops quietly."""
    env = {**os.environ, "REDIS_URL": redis_server_url}
    env.pop("PYTHONUNBUFFERED", None)  # a pipe's stdout is then written at exit, unless flushed before
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "control", "status"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # as head does once it has its line
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_status_names_the_redis_it_looked_at(capsys, redis_server_url: str) -> None:
    """Without REDIS_URL every command uses localhost's Redis: status says which one it read."""
    assert main(["control", "status", "--redis-url", redis_server_url]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"redis: {redis_server_url}"
    assert main(["control", "status", "--redis-url", redis_server_url, "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["redis"] == redis_server_url


def test_status_gives_the_models_counters_as_numbers(capsys, real_redis, redis_server_url: str) -> None:
    real_redis.zadd("rl:models", {"m1": time.time()})
    real_redis.hset("rl:model:m1:info", mapping={"consumer": "host:1:ab", "version": "12", "paused": "0"})
    assert main(["control", "status", "--redis-url", redis_server_url, "--output", "json"]) == 0
    info = json.loads(capsys.readouterr().out)["models"]["m1"]
    assert info == {"consumer": "host:1:ab", "version": 12, "paused": 0}


def test_forget_deletes_what_a_stopped_model_left(capsys, real_redis, settings, redis_server_url) -> None:
    """A model run once under a random ID leaves groups and state behind; ``control forget`` takes
    them away, and refuses a live model (it would only write its state again)."""
    from worker.model.loop import ModelWorker

    gone, live = [
        ModelWorker(settings.model_copy(update={"component_id": c}), real_redis) for c in ("gone", "on")
    ]
    for worker in (gone, live):
        worker.start()
    real_redis.hset("rl:contribution", mapping={"gone": 3.5, "on": 1.0})
    gone.shutdown()  # stopped: out of the registry, lease released; its groups and state stay
    assert main(["control", "status", "--redis-url", redis_server_url, "--output", "json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert groups["rl:observation model:gone"]["stale"] and "stale" not in groups["rl:observation model:on"]

    assert main(["control", "forget", "--redis-url", redis_server_url, "--component-id", "on"]) == 1
    assert "live, not forgotten" in capsys.readouterr().err and real_redis.exists("rl:model:on:checkpoint")

    assert main(["control", "forget", "--redis-url", redis_server_url, "--component-id", "gone"]) == 0
    assert "group model:gone of rl:observation" in capsys.readouterr().out
    assert real_redis.keys("rl:model:gone:*") == [] and real_redis.hkeys("rl:contribution") == [b"on"]
    for stream in ("rl:observation", "rl:evolution"):
        assert [g["name"] for g in real_redis.xinfo_groups(stream)] == [b"model:on"]
    assert main(["control", "forget", "--redis-url", redis_server_url, "--component-id", "gone"]) == 0
    assert capsys.readouterr().out == "gone: nothing to forget\n"
    live.shutdown()

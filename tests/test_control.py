"""control: what it reads from the status stream, and a generation given bad weights."""

from __future__ import annotations

import threading
import time

import msgpack
import redis

from tests.helpers import read
from worker.control.train import run_episodes
from worker.evolution.generation import REQUEST, evolve
from worker.evolution.settings import EvolutionSettings
from worker.protocol import Encoding, Streams, encode_entry


def answer_runs(client: redis.Redis, *reports: dict) -> threading.Thread:
    """A stand-in environment runner: on the next RUN, publish junk, then ``reports`` for its RUN_ID."""

    def runner() -> None:
        reply = client.xread({"rl:control": "$"}, block=5000)
        run_id = msgpack.unpackb(reply[0][1][0][1][b"data"])["RUN_ID"]
        client.xadd("rl:status", {"data": b"\xc1 not msgpack"})
        for report in reports:
            client.xadd(
                "rl:status", encode_entry({"EVENT": "run", "RUN_ID": run_id, **report}, Encoding.MSGPACK)
            )

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    time.sleep(0.1)  # its XREAD from $ must be waiting before the RUN goes out
    return thread


def test_run_episodes_skips_unreadable_and_malformed_status_entries(real_redis) -> None:
    runner = answer_runs(
        real_redis,
        {"EPISODES": "two", "STEPS": 10, "RETURNS": [1.0]},
        {"EPISODES": 2, "STEPS": 30, "RETURNS": [10.0, 20.0]},
    )
    result = run_episodes(real_redis, Streams("rl"), episodes=2, timeout=10)
    runner.join(5)
    assert result["episodes"] == 2 and result["mean_return"] == 15.0


def test_a_model_that_sends_ragged_weights_is_left_out_of_the_generation(
    real_redis, redis_server_url
) -> None:
    real_redis.zadd("rl:models", {"m1": time.time(), "m2": time.time()})

    def models() -> None:  # answer the GET; m2's vector is not flat
        reply = real_redis.xread({"rl:evolution": "$"}, block=5000)
        get_id = reply[0][1][0][0].decode()
        for component_id, weights in (("m1", [0.1, 0.2]), ("m2", [[0.1], [0.2, 0.3]])):
            message = {"WEIGHTS": weights, "COMPONENT_ID": component_id, "REQUEST_ID": get_id}
            real_redis.xadd("rl:weights", encode_entry(message, Encoding.MSGPACK))

    threading.Thread(target=models, daemon=True).start()
    time.sleep(0.1)
    settings = EvolutionSettings(
        _cli_parse_args=False, redis_url=redis_server_url, fitness="contribution", timeout=1
    )
    evolve(real_redis, settings)
    commands = [msgpack.unpackb(f[b"data"]) for _, f in real_redis.xrange("rl:evolution")]
    [set_command] = [c for c in commands if c["CMD"] == "SET"]
    assert set(set_command["WEIGHTS"]) == {"m1"}


def test_the_get_and_the_shares_are_taken_once_even_if_sent_twice(real_redis) -> None:
    """redis-py resends a command whose reply was lost: the second copy answers like the first."""
    real_redis.hset("rl:contribution", mapping={"m1": 3.0, "m2": 1.0})
    script = real_redis.register_script(REQUEST)
    keys = ["rl:evolution", "rl:contribution", "rl:generation", "rl:evolving"]
    args = [1000, b"\x81\xa3CMD\xa3GET", "1", '["m1", "m2"]', 7, "0-0", 60_000]
    first = script(keys=keys, args=args)
    again = script(keys=keys, args=args)
    assert first == again and real_redis.xlen("rl:evolution") == 1
    assert real_redis.get("rl:generation") == b"1"  # one generation, however often it is sent
    assert not real_redis.exists("rl:contribution")  # reset for the next generation
    shares = dict(zip(first[::2], first[1::2], strict=True))
    assert float(shares[b"m1"]) == 3.0 and float(shares[b"m2"]) == 1.0


def test_a_run_resent_after_a_lost_reply_is_run_and_counted_once(real_redis, redis_server_url) -> None:
    """redis-py resends an XADD whose reply was lost: the runner skips the second RUN with the same
    RUN_ID, and control counts one report per runner."""
    from worker.env.runner import EnvRunner, EnvSettings

    settings = EnvSettings(_cli_parse_args=False, redis_url=redis_server_url, n_envs=1, action_timeout=0.5)
    runner = EnvRunner(settings, real_redis)
    run = {"CMD": "RUN", "RUN_ID": "twice", "STEPS": 1}
    assert runner.handle_control(run) is not None  # no aggregator: aborted by its action timeout
    assert runner.handle_control(run) is None
    assert [m["RUN_ID"] for _, m in read(real_redis, "rl:status")] == ["twice"]
    real_redis.delete("rl:status")
    reports = ({"RUNNER_ID": "a", "STEPS": 3}, {"RUNNER_ID": "a", "STEPS": 3}, {"RUNNER_ID": "b", "STEPS": 5})
    thread = answer_runs(real_redis, *reports)
    assert run_episodes(real_redis, Streams("rl"), steps=3, runners=2)["steps"] == 3 + 5
    thread.join(5)

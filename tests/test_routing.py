"""Where the aggregator's actions go: each client's own reply stream (REPLY_TO), or the shared one."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.helpers import read, xadd
from tests.test_aggregator import contributions, register, started
from worker.aggregator import AggregatorSettings


@pytest.fixture
def agg_settings(redis_server_url: str) -> AggregatorSettings:
    return AggregatorSettings(
        _cli_parse_args=False, redis_url=redis_server_url, seed=0, block_ms=20, reply_ttl=60.0
    )


def reply(
    client: redis.Redis,
    obs_id: str,
    component_id: str,
    logits: list[float],
    encoding: str = "json",
    env_id: str = "cart-0",
    **extra: Any,
) -> None:
    """A model's logits reply, with the observation's REPLY_TO and STEP echoed as given in ``extra``."""
    message = {"LOGITS": logits, "COMPONENT_ID": component_id, "DETERMINISTIC": True}
    xadd(client, "rl:logits", {**message, "ENV_ID": env_id, "OBS_ID": obs_id, **extra}, encoding)


def decide(aggregator: Any, n: int) -> list[dict[str, Any]]:
    decided: list[dict[str, Any]] = []
    for _ in range(100):
        decided += aggregator.step()
        if len(decided) >= n:
            return decided
    raise AssertionError(f"decided {len(decided)} of {n}")


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_each_action_goes_to_the_stream_its_observation_named(real_redis, agg_settings, encoding) -> None:
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)
    reply(real_redis, "1-1", "m1", [5.0, 0.0], encoding, REPLY_TO="c1", STEP=7)
    reply(real_redis, "1-2", "m1", [0.0, 5.0], encoding, REPLY_TO="c2", STEP=3)
    reply(real_redis, "1-3", "m1", [5.0, 0.0], encoding)  # no REPLY_TO: the shared stream
    decide(aggregator, 3)  # one flush, three streams
    assert [m for _, m in read(real_redis, "rl:action:c1")] == [
        {"ACTION": 0, "ENV_ID": "cart-0", "OBS_ID": "1-1", "MODELS": 1, "DETERMINISTIC": True, "STEP": 7}
    ]
    assert [(m["OBS_ID"], m["ACTION"], m["STEP"]) for _, m in read(real_redis, "rl:action:c2")] == [
        ("1-2", 1, 3)
    ]
    [(_, shared)] = read(real_redis, "rl:action")
    assert shared["OBS_ID"] == "1-3" and "STEP" not in shared
    packed = [b"data" in f for s in ("rl:action:c1", "rl:action") for _, f in real_redis.xrange(s)]
    assert packed == [encoding == "msgpack"] * 2  # the encoding of the replies answered
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0


def test_clients_with_the_same_env_id_are_not_confused(real_redis, agg_settings) -> None:
    """Two clients both call their environment cart-0: their observations are told apart by OBS_ID."""
    register(real_redis, "m1", "m2")
    aggregator = started(agg_settings, real_redis, deadline_ms=10_000)
    reply(real_redis, "1-1", "m1", [9.0, 0.0], REPLY_TO="c1", STEP=1)
    reply(real_redis, "1-2", "m1", [0.0, 9.0], REPLY_TO="c2", STEP=1)
    reply(real_redis, "1-2", "m2", [0.0, 9.0], REPLY_TO="c2", STEP=1)
    reply(real_redis, "1-1", "m2", [9.0, 0.0], REPLY_TO="c1", STEP=1)
    assert len(decide(aggregator, 2)) == 2
    [(_, one)], [(_, two)] = read(real_redis, "rl:action:c1"), read(real_redis, "rl:action:c2")
    assert (one["OBS_ID"], one["ACTION"], one["MODELS"]) == ("1-1", 0, 2)
    assert (two["OBS_ID"], two["ACTION"], two["MODELS"]) == ("1-2", 1, 2)
    assert one["ENV_ID"] == two["ENV_ID"] == "cart-0" and not real_redis.exists("rl:action")


def test_private_reply_streams_expire_and_the_shared_one_does_not(real_redis, agg_settings) -> None:
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)  # reply_ttl 60 s
    reply(real_redis, "1-1", "m1", [0.0, 1.0], REPLY_TO="c1")
    reply(real_redis, "1-2", "m1", [0.0, 1.0])
    decide(aggregator, 2)
    assert 55_000 < real_redis.pttl("rl:action:c1") <= 60_000
    assert real_redis.pttl("rl:action") == -1  # exists, no TTL
    real_redis.pexpire("rl:action:c1", 5_000)
    reply(real_redis, "1-3", "m1", [0.0, 1.0], REPLY_TO="c1")
    decide(aggregator, 1)
    assert real_redis.pttl("rl:action:c1") > 55_000  # every action gives the stream its full TTL again
    assert real_redis.xlen("rl:action:c1") == 2


def test_a_flush_to_several_streams_sent_twice_is_written_once(real_redis, agg_settings, monkeypatch) -> None:
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)
    for k, reply_to in enumerate(["c1", "c2", None, "c1"]):
        reply(real_redis, f"1-{k}", "m1", [0.0, 1.0], **({"REPLY_TO": reply_to} if reply_to else {}))
    script = aggregator._flush_script
    results = []

    def twice(**kwargs: Any) -> Any:
        results.append(script(**kwargs))
        results.append(script(**kwargs))
        return results[-1]

    monkeypatch.setattr(aggregator, "_flush_script", twice)
    assert len(decide(aggregator, 4)) == 4
    assert results == [[], 0]  # the second copy found its entries acknowledged
    lengths = {s: real_redis.xlen(s) for s in ("rl:action:c1", "rl:action:c2", "rl:action")}
    assert lengths == {"rl:action:c1": 2, "rl:action:c2": 1, "rl:action": 1}
    assert contributions(real_redis) == {"m1": 4.0}
    assert real_redis.zcard("rl:decided") == 4


def test_a_reply_stream_holding_another_type_loses_only_its_own_actions(real_redis, agg_settings) -> None:
    """A client that made its reply key something else cannot stall the others, nor half-apply a flush."""
    register(real_redis, "m1")
    real_redis.set("rl:action:broken", "not a stream")
    aggregator = started(agg_settings, real_redis)
    reply(real_redis, "1-1", "m1", [0.0, 1.0], REPLY_TO="broken")
    reply(real_redis, "1-2", "m1", [0.0, 1.0], REPLY_TO="c1")
    assert len(decide(aggregator, 2)) == 2
    assert real_redis.get("rl:action:broken") == b"not a stream"
    assert real_redis.pttl("rl:action:broken") == -1
    assert real_redis.xlen("rl:action:c1") == 1 and not real_redis.exists("rl:action")
    assert contributions(real_redis) == {"m1": 2.0}
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0

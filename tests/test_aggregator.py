"""The aggregator: waiting for live models, deadlines, the decision rule, contributions, bad entries."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import redis

from tests.helpers import read, xadd
from worker.aggregator import Aggregator, AggregatorSettings
from worker.common.distributions import softmax
from worker.protocol import Encoding, encode_entry


@pytest.fixture
def agg_settings(redis_server_url: str) -> AggregatorSettings:
    return AggregatorSettings(
        _cli_parse_args=False, redis_url=redis_server_url, seed=0, block_ms=20, deadline_ms=300
    )


def register(client: redis.Redis, *component_ids: str) -> None:
    client.zadd("rl:models", {c: time.time() for c in component_ids})


def reply(
    client: redis.Redis,
    obs_id: str,
    component_id: str,
    logits: list[float],
    deterministic: bool = True,
    encoding: str = "json",
) -> None:
    """A model's logits reply, as :func:`worker.protocol.logits_reply` shapes it."""
    message = {"LOGITS": logits, "COMPONENT_ID": component_id, "DETERMINISTIC": deterministic}
    message.update(ENV_ID="env-0", OBS_ID=obs_id)
    if encoding == "json":  # strings JSON-quoted, as the worker writes them
        client.xadd("rl:logits", encode_entry(message, Encoding.JSON))
    else:
        xadd(client, "rl:logits", message, "msgpack")


def contributions(client: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall("rl:contribution").items()}


def started(settings: AggregatorSettings, client: redis.Redis, **update: Any) -> Aggregator:
    aggregator = Aggregator(settings.model_copy(update=update), client)
    aggregator.start()
    return aggregator


M1, M2 = [3.0, 0.0, 0.0], [0.0, 2.8, -10.0]  # mean of probabilities picks 1, mean of logits 0


def test_the_two_combination_rules_disagree_on_the_example() -> None:
    assert np.argmax(softmax(np.array([M1, M2])).mean(axis=0)) == 1
    assert np.argmax(np.mean([M1, M2], axis=0)) == 0


@pytest.mark.parametrize(("combine", "expected"), [("prob", 1), ("logits", 0)])
def test_waits_for_every_live_model_then_decides(real_redis, agg_settings, combine, expected) -> None:
    register(real_redis, "m1", "m2")
    aggregator = started(agg_settings, real_redis, combine=combine, deadline_ms=10_000)
    reply(real_redis, "1-1", "m1", M1)
    assert aggregator.step() == []  # m2 is live and has not answered
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 1  # acked with its decision
    reply(real_redis, "1-1", "m2", M2)
    [action] = aggregator.step()
    assert action == {
        "ACTION": expected,
        "ENV_ID": "env-0",
        "OBS_ID": "1-1",
        "MODELS": 2,
        "DETERMINISTIC": True,
    }
    assert [m for _, m in read(real_redis, "rl:action")] == [action]
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0

    shares = contributions(real_redis)
    p = softmax(np.array([M1, M2]))[:, expected]
    np.testing.assert_allclose([shares["m1"], shares["m2"]], p / p.sum(), rtol=1e-9)
    assert shares["m1"] + shares["m2"] == pytest.approx(1.0)


def test_models_that_join_are_awaited_from_their_first_reply(real_redis, agg_settings) -> None:
    """The registry was empty at the aggregator's last look; the first reply of a model it does not
    know makes it look again at once, so it waits for the other model that joined with it."""
    aggregator = started(agg_settings, real_redis, deadline_ms=10_000)
    assert aggregator.step(block_ms=0) == [] and aggregator.live == set()
    register(real_redis, "m1", "m2")
    reply(real_redis, "1-1", "m1", M1)
    assert aggregator.step() == [] and aggregator.live == {"m1", "m2"}
    reply(real_redis, "1-1", "m2", M2)
    [action] = aggregator.step()
    assert action["MODELS"] == 2


def test_a_model_that_registered_before_the_observation_is_awaited(real_redis, agg_settings) -> None:
    """The aggregator's last look saw m1 alone; m2 registered after it, then the observation came.
    The first reply is m1's, a model it knows: it looks again, as the observation is newer than its
    view, and waits for m2 instead of deciding with m1 alone."""
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis, deadline_ms=10_000)
    assert aggregator.step(block_ms=0) == [] and aggregator.live == {"m1"}
    time.sleep(0.01)
    register(real_redis, "m2")
    seconds, micros = real_redis.time()
    obs_id = f"{seconds * 1000 + micros // 1000 + 1}-0"  # published after m2 registered
    reply(real_redis, obs_id, "m1", M1)
    assert aggregator.step() == [] and aggregator.live == {"m1", "m2"}
    reply(real_redis, obs_id, "m2", M2)
    [action] = aggregator.step()
    assert action["MODELS"] == 2


def test_contributions_sum_to_one_per_decision(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2", "m3")
    aggregator = started(agg_settings, real_redis)
    rng = np.random.default_rng(1)
    for k in range(20):
        for component_id in ("m1", "m2", "m3"):
            reply(real_redis, f"1-{k}", component_id, rng.normal(size=4).tolist(), deterministic=False)
    decided = []
    while len(decided) < 20:
        decided += aggregator.step()
    assert all(a["MODELS"] == 3 for a in decided)
    assert sum(contributions(real_redis).values()) == pytest.approx(20.0)


def test_deadline_decides_without_a_silent_model_and_ignores_late_replies(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2")
    aggregator = started(agg_settings, real_redis)  # deadline 300 ms
    begin = time.monotonic()
    reply(real_redis, "1-1", "m1", [0.0, 1.0])
    decided = []
    while not decided:
        decided = aggregator.step()
    assert 0.25 <= time.monotonic() - begin < 2.0
    assert decided[0]["MODELS"] == 1 and decided[0]["ACTION"] == 1

    reply(real_redis, "1-1", "m2", [5.0, 0.0])  # too late: the environment already has its action
    reply(real_redis, "1-1", "m1", [0.0, 1.0])  # and a duplicate
    assert aggregator.step() == [] and aggregator.step() == []
    assert len(real_redis.xrange("rl:action")) == 1
    assert contributions(real_redis) == {"m1": 1.0}
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0


def test_observations_answered_by_different_models_are_decided_in_one_step(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2")
    aggregator = started(agg_settings, real_redis, deadline_ms=200)
    reply(real_redis, "1-1", "m1", [0.0, 9.0])
    reply(real_redis, "1-2", "m1", [9.0, 0.0], deterministic=True)
    reply(real_redis, "1-2", "m2", [9.0, 0.0], deterministic=True)
    reply(real_redis, "1-3", "m2", [0.0, 0.0, 9.0])  # another action space, answered by m2 alone
    first = aggregator.step()  # reads all four; 1-2 is complete
    time.sleep(0.25)
    second = aggregator.step()  # 1-1 and 1-3 past their deadline: two groups, one step
    assert [a["OBS_ID"] for a in first] == ["1-2"] and len(second) == 2
    decided = {a["OBS_ID"]: a for a in first + second}
    assert {k: (a["MODELS"], a["ACTION"]) for k, a in decided.items()} == {
        "1-1": (1, 1),
        "1-2": (2, 0),
        "1-3": (1, 2),
    }
    assert contributions(real_redis) == {"m1": pytest.approx(1.5), "m2": pytest.approx(1.5)}


def test_dead_models_are_not_awaited(real_redis, agg_settings) -> None:
    register(real_redis, "m1")
    real_redis.zadd("rl:models", {"gone": time.time() - 60})  # heartbeat older than registry_max_age
    aggregator = started(agg_settings, real_redis, deadline_ms=10_000)
    reply(real_redis, "1-1", "m1", [0.0, 1.0])
    [action] = aggregator.step()
    assert action["MODELS"] == 1


def test_single_model_samples_its_softmax(real_redis, agg_settings) -> None:
    """With one model the aggregator is a plain policy: actions ~ softmax(logits)."""
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis, seed=7)
    logits, n = [0.5, 0.0, -1.0, 1.5], 4000
    with real_redis.pipeline(transaction=False) as pipe:
        for k in range(n):
            message = {"LOGITS": logits, "COMPONENT_ID": "m1", "DETERMINISTIC": False}
            pipe.xadd(
                "rl:logits", encode_entry({**message, "ENV_ID": "e", "OBS_ID": f"1-{k}"}, Encoding.MSGPACK)
            )
        pipe.execute()
    actions: list[int] = []
    while len(actions) < n:
        actions += [a["ACTION"] for a in aggregator.step()]
    counts = np.bincount(actions, minlength=4)
    expected = n * softmax(np.array(logits))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, expected)  # 3 degrees of freedom, p = 0.001
    assert contributions(real_redis) == {"m1": pytest.approx(n)}  # a lone model gets every share


def test_reply_encoding_is_kept(real_redis, agg_settings) -> None:
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)
    reply(real_redis, "1-1", "m1", [0.0, 1.0], encoding="msgpack")
    reply(real_redis, "1-2", "m1", [1.0, 0.0], encoding="json")
    decided = []
    while len(decided) < 2:
        decided += aggregator.step()
    packed, plain = (fields for _, fields in real_redis.xrange("rl:action"))
    assert b"data" in packed and b"ACTION" in plain and plain[b"OBS_ID"] == b'"1-2"'
    assert [m["ACTION"] for _, m in read(real_redis, "rl:action")] == [1, 0]


def test_bad_entries_are_dead_lettered(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2")
    aggregator = started(agg_settings, real_redis, deadline_ms=10_000)
    real_redis.xadd("rl:logits", {"data": b"\xc1"})
    real_redis.xadd("rl:logits", {"LOGITS": "[NaN, 1]", "COMPONENT_ID": "m1", "OBS_ID": "1-1"})
    real_redis.xadd("rl:logits", {"LOGITS": "abc", "COMPONENT_ID": "m1", "OBS_ID": "1-1"})
    real_redis.xadd("rl:logits", {"LOGITS": "[true, 1]", "COMPONENT_ID": "m1", "OBS_ID": "1-1"})
    real_redis.xadd("rl:logits", {"LOGITS": "[0, 1]", "COMPONENT_ID": "m1"})
    real_redis.xadd("rl:logits", {"LOGITS": "[0, 1]", "OBS_ID": "1-1"})
    real_redis.xadd(
        "rl:logits", {"LOGITS": "[0, 1]", "COMPONENT_ID": "m1", "OBS_ID": "1-1", "DETERMINISTIC": "2"}
    )
    reply(real_redis, "1-1", "m1", [0.0, 1.0])
    reply(real_redis, "1-1", "m2", [0.0, 1.0, 2.0])  # another number of actions than m1's
    assert aggregator.step() == []
    reasons = [fields[b"dead:reason"].decode() for _, fields in real_redis.xrange("rl:dead")]
    expected = ["msgpack", "finite", "LOGITS", "LOGITS", "OBS_ID", "COMPONENT_ID", "DETERMINISTIC", "actions"]
    assert len(reasons) == len(expected)
    for reason, word in zip(reasons, expected, strict=True):
        assert word in reason, reasons
    assert all(f[b"dead:stream"] == b"rl:logits" for _, f in real_redis.xrange("rl:dead"))
    reply(real_redis, "1-1", "m2", [1.0, 0.0])
    [action] = aggregator.step()
    assert action["MODELS"] == 2
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0


def test_restart_takes_back_undecided_replies(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2")
    first = started(agg_settings, real_redis, deadline_ms=10_000)
    reply(real_redis, "1-1", "m1", [0.0, 1.0])
    assert first.step() == []
    second = started(agg_settings, real_redis, deadline_ms=10_000)  # the first one crashed
    reply(real_redis, "1-1", "m2", [0.0, 1.0])
    [action] = second.step()
    assert action["MODELS"] == 2


# --------------------------------------------------------------------------- failures while flushing


def test_a_failed_flush_keeps_the_decisions_for_the_next_step(real_redis, agg_settings, monkeypatch) -> None:
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)
    reply(real_redis, "1-0", "m1", [0.0, 1.0])
    script = aggregator._flush_script

    def down(**_: Any) -> None:
        raise redis.ConnectionError("Redis went away during the flush")

    monkeypatch.setattr(aggregator, "_flush_script", down)
    with pytest.raises(redis.ConnectionError):
        aggregator.step()
    monkeypatch.setattr(aggregator, "_flush_script", script)
    assert [a["OBS_ID"] for a in aggregator.step()] == ["1-0"]
    assert len(real_redis.xrange("rl:action")) == 1 and contributions(real_redis) == {"m1": 1.0}


def test_a_flush_sent_twice_is_written_once(real_redis, agg_settings, monkeypatch) -> None:
    """redis-py resends a command whose reply was lost: the second copy finds its entries acknowledged."""
    register(real_redis, "m1")
    aggregator = started(agg_settings, real_redis)
    reply(real_redis, "1-0", "m1", [0.0, 1.0])
    script = aggregator._flush_script

    def twice(**kwargs: Any) -> Any:
        script(**kwargs)
        return script(**kwargs)

    monkeypatch.setattr(aggregator, "_flush_script", twice)
    assert len(aggregator.step()) == 1
    assert len(real_redis.xrange("rl:action")) == 1 and contributions(real_redis) == {"m1": 1.0}


def test_a_restarted_aggregator_does_not_decide_again(real_redis, agg_settings) -> None:
    register(real_redis, "m1", "m2")
    first = started(agg_settings, real_redis, deadline_ms=50)
    reply(real_redis, "1-0", "m1", [0.0, 1.0])
    first.step()
    time.sleep(0.06)
    assert len(first.step()) == 1  # decided without m2
    second = started(agg_settings, real_redis)  # a restart
    reply(real_redis, "1-0", "m2", [5.0, 0.0])  # m2's late reply
    assert second.step() == [] and len(real_redis.xrange("rl:action")) == 1
    assert contributions(real_redis) == {"m1": 1.0}


def test_serve_survives_its_logits_stream_being_deleted(real_redis, agg_settings) -> None:
    register(real_redis, "m1")
    aggregator = Aggregator(agg_settings, real_redis)
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    try:  # a failure must not leave the thread reading the group of later tests
        time.sleep(0.3)
        real_redis.delete("rl:logits")  # with the group: the blocked read fails (UNBLOCKED / NOGROUP)
        deadline = time.monotonic() + 10
        while not real_redis.exists("rl:logits") and time.monotonic() < deadline:
            time.sleep(0.05)  # serve makes the group (and the stream) again
        reply(real_redis, "1-0", "m1", [0.0, 1.0])
        while not real_redis.xlen("rl:action") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        aggregator.stop()
        thread.join(5)
    assert thread.is_alive() is False and len(real_redis.xrange("rl:action")) == 1

"""The client library against real model workers and the aggregator on a real redis-server: each
mode, bad observations, timeouts, resends, reconnects, and clients kept apart."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import redis

from tests.components import aggregator, model, running
from tests.helpers import read, values
from worker.client import ActionTimeout, AsyncPolicyClient, ModelsUnavailable, PolicyClient
from worker.client.core import Chain

OBS = [0.01, -0.02, 0.03, 0.04]


def obs(k: int) -> list[float]:
    return [0.01 * k, -0.02, 0.03, 0.04 * (k % 3)]


def test_act_end_and_act_many_in_ensemble_mode(real_redis, settings) -> None:
    url = settings.redis_url
    models = model(settings, "m1"), model(settings, "m2", seed=1)
    with running(*models, aggregator(url)), PolicyClient(url, timeout=5.0, client_id="c1") as client:
        assert client.spaces.observation.shape == (4,) and client.spaces.action.n == 2
        first = client.act("robot-1", OBS)
        second = client.act("robot-1", obs(1), reward=1.0)
        client.end("robot-1", obs(2), reward=0.5, terminated=True)
        third = client.act("robot-1", obs(3))
        both = client.act_many({"e1": obs(4), "e2": obs(5)})
        numbered = client.act(7, obs(4))  # an integer ENV_ID is its decimal text, as on the wire
        assert client.act_many({7: obs(5)}, rewards={7: 1.0}).keys() == {7} and numbered in (0, 1)
        again = client.act_many({"e1": obs(6), "e2": obs(7)}, rewards={"e1": 1.0, "e2": 0.0})
    assert {first, second, third} <= {0, 1} and all(type(a) is int for a in (first, second, third))
    assert set(both) == set(again) == {"e1", "e2"}
    steps = [m for _, m in read(real_redis, "rl:observation")]
    robot = [m for m in steps if m["ENV_ID"] == "robot-1"]
    assert [m["STEP"] for m in robot] == [1, 2, 3] and all(m["REPLY_TO"] == "c1" for m in steps)
    assert "REWARD" not in robot[0] and (robot[1]["REWARD"], robot[1]["ACTION"]) == (1.0, first)
    # end() travels with the next observation, as the protocol carries an episode's end.
    assert robot[2]["DONE"] is True and (robot[2]["REWARD"], robot[2]["ACTION"]) == (0.5, second)
    assert "TRUNCATED" not in robot[2] and values(robot[2]["OBSERVATION"]) == pytest.approx(obs(3))
    with pytest.raises(RuntimeError, match="'c1' is closed"):
        client.act("robot-1", OBS)
    # Closed: its reply stream and key are deleted; no action ever went to the shared stream.
    assert not real_redis.exists("rl:action:c1", "rl:client:c1") and real_redis.xlen("rl:action") == 0


def test_truncation_sends_the_terminal_observation(real_redis, settings) -> None:
    with running(model(settings), aggregator(settings.redis_url)):
        client = PolicyClient(settings.redis_url, timeout=5.0)
        client.act("e", OBS)
        client.end("e", obs(9), reward=1.0, truncated=True)
        client.act("e", obs(1))
        client.close()
    last = read(real_redis, "rl:observation")[-1][1]
    assert last["TRUNCATED"] is True and values(last["TERMINAL_OBSERVATION"]) == pytest.approx(obs(9))


def test_bad_observations_are_rejected_in_the_client(real_redis, settings) -> None:
    with running(model(settings)):
        client = PolicyClient(settings.redis_url, timeout=2.0)
        cases = [
            (lambda: client.act("e-1", [0.0, 0.0, 0.0]), "OBSERVATION must have shape [4], got [3]"),
            (lambda: client.act("e-1", [0.0, np.nan, 0.0, 0.0]), "OBSERVATION must be finite"),
            (lambda: client.act("e-1", "up"), "OBSERVATION"),
            (lambda: client.act("e-1", OBS, reward=1.0), "a reward is for the previous action"),
            (lambda: client.end("e-1", OBS, reward=1.0, terminated=True), "none was taken"),
            (lambda: client.act_many({"a": OBS}, rewards={"b": 1.0}), "without an observation"),
        ]
        for call, reason in cases:
            with pytest.raises(ValueError, match="e-1|without") as caught:
                call()
            assert reason in str(caught.value), caught.value
        assert client.act_many({}) == {}  # nothing to ask
        client.core.chains["e-1"] = Chain(step=1, action=0)  # as after a first step answered with 0
        for reward in (True, "1"):  # the wire rejects them too: no silent conversion
            with pytest.raises(ValueError, match="'e-1': REWARD must be a number, got"):
                client.act("e-1", OBS, reward=reward)
        with pytest.raises(ValueError, match="'e-1': REWARD must be finite"):
            client.act("e-1", OBS, reward=float("inf"))
        client.close()
    assert real_redis.xlen("rl:observation") == 0  # nothing bad was ever published


def test_a_timeout_names_the_environment_and_the_observation(real_redis, settings) -> None:
    with running(model(settings)):  # no aggregator: nobody decides
        client = PolicyClient(settings.redis_url, timeout=0.5, client_id="lonely")
        started = time.monotonic()
        with pytest.raises(ActionTimeout) as caught:
            client.act("cart-9", OBS)
        took = time.monotonic() - started
        client.close()
    [(obs_id, _)] = read(real_redis, "rl:observation")
    assert caught.value.env_id == "cart-9" and caught.value.obs_id == obs_id
    assert "cart-9" in str(caught.value) and obs_id in str(caught.value) and "aggregator" in str(caught.value)
    assert 0.4 < took < 3.0


def test_no_live_model_is_a_clear_error(real_redis, redis_server_url) -> None:
    client = PolicyClient(redis_server_url, timeout=0.3)
    with pytest.raises(ModelsUnavailable, match="no live model in rl:models"):
        client.act("e", OBS)
    direct = PolicyClient(redis_server_url, timeout=0.3, mode="direct", model="ghost")
    with pytest.raises(ModelsUnavailable, match="'ghost'"):
        direct.act("e", OBS)
    with pytest.raises(ValueError, match="needs model"):
        PolicyClient(redis_server_url, mode="local")


def test_a_step_resent_after_a_lost_reply_is_learned_once(real_redis, settings) -> None:
    """The reply to a step is lost (here: nobody answered in time); the caller sends the same step
    again: one entry, one action, one transition."""
    worker = model(settings)
    with running(worker, aggregator(settings.redis_url)) as run:
        client = PolicyClient(settings.redis_url, timeout=3.0, client_id="c")
        first = client.act("e", OBS)
        run.stop(1)  # the aggregator goes away: the next step gets no answer
        client.core.timeout = 0.5
        with pytest.raises(ActionTimeout):
            client.act("e", obs(1), reward=1.0)
        client.core.timeout = 5.0
        run.add(aggregator(settings.redis_url))
        client.act("other", OBS)  # reads past the late action of e's step: kept aside
        again = client.act("e", obs(1), reward=1.0)  # the same step once more
        client.act("e", obs(2), reward=1.0)
        client.close()
    steps = [m for _, m in read(real_redis, "rl:observation") if m["ENV_ID"] == "e"]
    assert [m["STEP"] for m in steps] == [1, 2, 3]  # the resent step was published once
    answers = [m for _, m in read(real_redis, "rl:logits")]
    assert len(answers) == 4 and {first, again} <= {0, 1}
    assert worker.counters.transitions == 2 and worker.counters.repeats == 0


def test_a_duplicate_entry_of_a_step_is_not_learned_twice(real_redis, settings) -> None:
    worker = model(settings)
    with running(worker, aggregator(settings.redis_url)):
        client = PolicyClient(settings.redis_url, timeout=5.0, client_id="c")
        client.act("e", OBS)
        client.act("e", obs(1), reward=1.0)
        entry = real_redis.xrange("rl:observation")[-1][1]
        real_redis.xadd("rl:observation", entry)  # published twice by another program
        client.act("e", obs(2), reward=1.0)
        client.close()
    assert worker.counters.transitions == 2 and worker.counters.repeats == 1


def test_two_clients_never_see_each_others_actions(real_redis, settings) -> None:
    url = settings.redis_url
    with running(model(settings), aggregator(url)):
        a = PolicyClient(url, timeout=5.0, client_id="a", trim_replies=False)
        b = PolicyClient(url, timeout=5.0, client_id="b", trim_replies=False)
        for k in range(5):  # the same ENV_ID in both: still two environments
            a.act_many({"e": obs(k)}, rewards={"e": 1.0} if k else None)
            b.act_many({"e": obs(k + 10)}, rewards={"e": 1.0} if k else None)
    published = {obs_id: m["REPLY_TO"] for obs_id, m in read(real_redis, "rl:observation")}
    for name in ("a", "b"):
        answered = [m["OBS_ID"] for _, m in read(real_redis, f"rl:action:{name}")]
        assert len(answered) == 5 and {published[i] for i in answered} == {name}
    assert real_redis.xlen("rl:action") == 0


def test_the_client_rides_out_a_killed_connection(real_redis, settings) -> None:
    url = settings.redis_url
    real_redis.zadd("rl:models", {"ghost": time.time() + 60})  # awaited in vain: decided after 1 s
    with running(model(settings), aggregator(url, deadline_ms=1000)):
        client = PolicyClient(url, timeout=10.0)
        assert client.spaces.action.n == 2  # discovered first: the kill lands during the wait
        connection = client.redis.client_id()

        def kill() -> None:
            time.sleep(0.3)
            real_redis.client_kill_filter(_id=connection)

        threading.Thread(target=kill, daemon=True).start()
        started = time.monotonic()
        assert client.act("e", OBS) in (0, 1)
        assert time.monotonic() - started > 0.9  # the action came after the kill
        assert client.redis.client_id() != connection  # it did reconnect
        client.close()


def test_direct_mode_is_answered_by_the_model_itself(real_redis, settings) -> None:
    worker = model(settings)
    direct = PolicyClient(settings.redis_url, mode="direct", model="m1", timeout=5.0, client_id="d")
    with running(worker), direct as client:  # no aggregator
        actions = [client.act("e", OBS)] + [client.act("e", obs(k), reward=1.0) for k in range(1, 8)]
        greedy = client.act("eval", OBS, deterministic=True)
    assert set(actions) <= {0, 1} and greedy in (0, 1)
    assert real_redis.xlen("rl:observation") == 0 and real_redis.xlen("rl:logits") == 0
    assert real_redis.xlen("rl:model:m1:observation") == 9
    assert worker.counters.transitions == 7


def test_local_mode_acts_on_a_copy_and_the_model_learns(real_redis, settings) -> None:
    worker = model(settings, n_steps=2)
    with running(worker):
        with PolicyClient(
            settings.redis_url, mode="local", model="m1", timeout=5.0, max_lag=4, flush_every=2
        ) as client:
            actions = [client.act("e", OBS)] + [client.act("e", obs(k), reward=1.0) for k in range(1, 40)]
            copy = client.core.local.policy
            assert client.core.local.lag() <= 4 + 2
            assert client.core.local.published_updates > 0  # refreshed from newer weights
            published = np.frombuffer(real_redis.hget("rl:model:m1:policy", "weights"), "<f4")
        deadline = time.monotonic() + 5
        while worker.counters.transitions < 39 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert set(actions) <= {0, 1} and copy is not None
    counters = worker.counters
    assert counters.transitions == 39 and counters.segments == 19 and counters.updates > 1
    assert real_redis.xlen("rl:action") == 0 and real_redis.xlen("rl:logits") == 0
    assert published.size == worker.learner.n_params


def test_async_client_serves_64_environments_at_once(real_redis, settings) -> None:
    url = settings.redis_url

    async def play(client: AsyncPolicyClient, env: str) -> list[int]:
        actions = [await client.act(env, obs(0))]
        for k in range(1, 5):
            actions.append(await client.act(env, obs(k), reward=1.0))
        return actions

    async def main() -> list[list[int]]:
        async with AsyncPolicyClient(url, timeout=10.0, client_id="many") as client:
            return await asyncio.gather(*(play(client, f"e{k}") for k in range(64)))

    worker = model(settings)
    with running(worker, aggregator(url)):
        played = asyncio.run(main())
    assert len(played) == 64 and all(len(a) == 5 and set(a) <= {0, 1} for a in played)
    assert real_redis.xlen("rl:observation") == 64 * 5
    steps: dict[str, list[int]] = {}
    for _, m in read(real_redis, "rl:observation"):
        steps.setdefault(m["ENV_ID"], []).append(m["STEP"])
    assert all(s == [1, 2, 3, 4, 5] for s in steps.values())


def test_wrong_credentials_fail_at_once(redis_server_url) -> None:
    url = redis_server_url.replace("redis://", "redis://nobody:wrong@")
    with pytest.raises((SystemExit, redis.AuthenticationError)):
        PolicyClient(url)

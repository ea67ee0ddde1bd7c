"""The runner's asynchronous stepping (``--stepping async``) through a real redis-server: each
environment steps as soon as its own action arrives, with the runs, chains and reports of lockstep."""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from typing import Any

import gymnasium as gym
import pytest
import redis

from tests import components
from tests.chains import answered_once, delivered, learned_once
from tests.faults.chaos.checks import drained
from tests.helpers import read, xadd
from tests.scripted import Message, alternate, balance, failing, serve, statuses
from worker.client import ActionTimeout, PolicyClient
from worker.env import StepCost
from worker.env.runner import EnvRunner
from worker.protocol import Encoding, Spaces, Streams, decode_entry, encode_entry


@pytest.fixture
def async_settings(env_settings):
    return env_settings.model_copy(update={"n_envs": 4, "stepping": "async", "trim_replies": False})


def test_async_runs_keep_their_targets_chains_and_reports(real_redis, async_settings, scripted) -> None:
    """Steps targets are exact, chains carry over between runs, evaluation envs keep their quotas,
    and every observation's action moves its own environment."""
    runner = EnvRunner(async_settings.model_copy(update={"max_episode_steps": 7}), real_redis)
    fake = scripted(alternate)
    first = runner.run("r1", steps=9)
    assert first["STEPS"] == 9 and "ERROR" not in first
    assert len(fake.seen) == 9  # never more observations published than the steps asked for
    n = len(fake.seen)
    second = runner.run("r2", episodes=5)
    assert second["EPISODES"] >= 5 and len(second["RETURNS"]) == 5 and second["STEPS"] == len(fake.seen) - n
    for _, message in fake.seen[n : n + 4]:
        assert "REWARD" in message  # each env's chain continues across runs
    assert not any(slot.waiting for slot in runner.train)  # the actions asked for were all applied
    episodes = [s for s in statuses(real_redis) if s["EVENT"] == "episode" and s["RUN_ID"] == "r2"]
    assert len(episodes) == second["EPISODES"] and all(s["LENGTH"] == 7 for s in episodes)

    fake.policy = balance
    n = len(fake.seen)
    evaluation = runner.run("e1", episodes=6, deterministic=True)
    ended = Counter(s["ENV_ID"] for s in statuses(real_redis) if s.get("RUN_ID") == "e1" and "ENV_ID" in s)
    assert evaluation["EPISODES"] == 6 and sorted(ended.values()) == [1, 1, 2, 2]  # each its share
    assert all(m["DETERMINISTIC"] is True for _, m in fake.seen[n:])

    observations, actions = answered_once(real_redis, "env")
    assert sum(delivered(observations, actions).values()) > 30


def test_different_step_costs_take_different_numbers_of_steps(real_redis, async_settings, scripted) -> None:
    """Two cheap environments and two that wait 40 ms a step: asynchronously the cheap ones take
    several times as many steps in the same run; in lockstep every env waits for the slowest."""
    counts = {}
    scripted(alternate)
    for stepping in ("async", "lockstep"):
        settings = async_settings.model_copy(update={"stepping": stepping, "runner_id": stepping})
        runner = EnvRunner(settings.model_copy(update={"step_threads": 4}), real_redis)
        for slot in runner.train[2:]:
            slot.env = StepCost(slot.env, 40.0, "wait")
        report = runner.run("r", steps=120)
        assert report["STEPS"] == 120
        observations, actions = answered_once(real_redis, stepping)
        delivered(observations, actions)
        counts[stepping] = Counter(m["ENV_ID"] for _, m in observations)
        runner.shutdown()
    fast = counts["async"]["async-0"] + counts["async"]["async-1"]
    slow = counts["async"]["async-2"] + counts["async"]["async-3"]
    assert fast >= 4 * slow, counts["async"]
    assert max(counts["lockstep"].values()) - min(counts["lockstep"].values()) <= 1, counts["lockstep"]


def test_slow_answers_hold_up_their_own_environment_only(real_redis, async_settings) -> None:
    """env-3's actions come 100 ms late: the other three step meanwhile, and a publish carries every
    env ready at that moment (so one publish holds several)."""
    answerer = Delayed(async_settings.redis_url, {"env-3": 0.1})
    answerer.start()
    try:
        runner = EnvRunner(async_settings, real_redis)
        assert runner.run("r", steps=80)["STEPS"] == 80
    finally:
        answerer.halt.set()
        answerer.join(5)
    observations, actions = answered_once(real_redis, "env")
    per_env = Counter(m["ENV_ID"] for _, m in observations)
    assert per_env["env-3"] * 3 <= per_env["env-0"], per_env
    delivered(observations, actions)
    # Several envs in one publish: publish.lua gives the entries of one call consecutive IDs.
    ids = [tuple(map(int, i.split("-"))) for i, _ in observations]
    assert any(b == (a[0], a[1] + 1) for a, b in zip(ids[4:], ids[5:], strict=False))


class Delayed(threading.Thread):
    """Answers every observation with ``step % 2``, those of the envs in ``delays`` that many
    seconds late, without holding up the others' answers."""

    def __init__(self, url: str, delays: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.client, self.delays, self.halt = redis.Redis.from_url(url), delays, threading.Event()

    def run(self) -> None:
        cursor, steps, due = "0-0", Counter(), []
        while not self.halt.is_set():
            for _, items in self.client.xread({"rl:observation": cursor}, block=2) or []:
                for raw_id, fields in items:
                    cursor = raw_id.decode()
                    message, _ = decode_entry(fields, 1 << 20)
                    env_id = message["ENV_ID"]
                    reply = {"ACTION": steps[env_id] % 2, "ENV_ID": env_id, "OBS_ID": cursor, "MODELS": 1}
                    steps[env_id] += 1
                    heapq.heappush(due, (time.monotonic() + self.delays.get(env_id, 0.0), cursor, reply))
            while due and due[0][0] <= time.monotonic():
                reply = heapq.heappop(due)[2]
                self.client.xadd("rl:action:env", encode_entry(reply, Encoding.MSGPACK))


@pytest.mark.parametrize("stepping", ["async", "lockstep"])
def test_an_outage_longer_than_the_action_timeout_resends_only_the_unanswered(
    real_redis, async_settings, scripted, stepping
) -> None:
    """env-0's action is in, env-1's is late, then Redis is unreachable for longer than the action
    timeout: env-0 steps on its action and env-1's step is sent again (one entry, one action); an
    answered step sent again would be a new step that never happened in the environment."""
    settings = async_settings.model_copy(update={"n_envs": 2, "action_timeout": 1.0, "stepping": stepping})
    runner = EnvRunner(settings, real_redis)

    def late(message: Message, step: int) -> int:
        if message["ENV_ID"] == "env-1" and message["STEP"] == 3:
            time.sleep(0.4)
        return step % 2

    fake = scripted(late)
    down: dict[str, float | None] = {"until": None}

    def unreachable(command: str) -> None:
        chains = runner.client.core.chains
        if command == "XREAD" and down["until"] is None and "env-1" in chains:
            first, second = chains["env-0"], chains["env-1"]
            if second.step == 3 and second.unanswered and (first.step > 3 or not first.unanswered):
                down["until"] = time.monotonic() + 2.5
        if command == "XREAD" and down["until"] and time.monotonic() < down["until"]:
            raise redis.ConnectionError("Redis went away mid-run")

    with failing(real_redis, unreachable):
        report = runner.run("r1", steps=10)
    assert down["until"] is not None and "ERROR" not in report and report["STEPS"] == 10
    assert len(fake.seen) == 10
    observations, actions = answered_once(real_redis, "env")
    assert sum(delivered(observations, actions).values()) == 10 - 2  # every step after the first


def test_async_action_timeout_aborts_and_a_stop_ends_the_run(real_redis, async_settings, scripted) -> None:
    """An unanswered env aborts the run once its action times out, while the others kept stepping;
    its chain starts afresh in the next run. A STOP during an async run aborts it at once."""
    runner = EnvRunner(async_settings.model_copy(update={"action_timeout": 0.5}), real_redis)
    fake = scripted(lambda message, step: None if message["ENV_ID"] == "env-2" and step == 3 else step % 2)
    report = runner.run("r1", steps=400)
    assert "env-2" in report["ERROR"] and statuses(real_redis)[-1] == report
    per_env = Counter(m["ENV_ID"] for _, m in fake.seen)
    assert per_env["env-2"] == 4 and per_env["env-0"] > 4  # the others did not wait for env-2
    assert not any(slot.waiting for slot in runner.train)
    n = len(fake.seen)
    assert runner.run("r2", steps=8)["STEPS"] == 8
    restarted = {m["ENV_ID"]: m for _, m in reversed(fake.seen[n:])}
    assert "REWARD" not in restarted["env-2"]  # an env stepped but not yet published carries on
    delivered(fake.seen, fake.answers)  # and its chain is whole

    fake.policy = lambda message, step: None  # nothing answers: the run waits
    runner = EnvRunner(async_settings.model_copy(update={"action_timeout": 60.0}), real_redis)
    runner.start()
    xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "stuck", "STEPS": 100})
    n = len(fake.seen)

    def stop_when_waiting() -> None:
        while len(fake.seen) < n + 4:
            time.sleep(0.01)
        xadd(real_redis, "rl:control", {"CMD": "STOP"})

    threading.Thread(target=stop_when_waiting, daemon=True).start()
    started = time.monotonic()
    serve(runner)
    assert time.monotonic() - started < 3 and statuses(real_redis)[-1] == {
        "EVENT": "run",
        "RUN_ID": "stuck",
        "RUNNER_ID": "env",
        "ERROR": "runner stopping",
    }


def test_models_answer_every_async_step_and_learn_each_once(real_redis, settings, async_settings) -> None:
    """Two real model workers and the aggregator, six environments stepping on their own: every
    observation answered once, by an action that moved its own environment, and the models' committed
    counters are exactly what the observation stream implies."""
    url = async_settings.redis_url
    models = [components.model(settings, cid, seed=k) for k, cid in enumerate(("m1", "m2"))]
    with components.running(*models, components.aggregator(url)):
        runner = EnvRunner(async_settings.model_copy(update={"n_envs": 6}), redis.Redis.from_url(url))
        played = runner.run("play", steps=300)
        evaluated = runner.run("evaluate", episodes=6, deterministic=True)
        again = runner.run("again", steps=60)
        runner.shutdown()
        _wait_drained(real_redis, ["m1", "m2"])
    assert (played["STEPS"], again["STEPS"]) == (300, 60) and evaluated["EPISODES"] == 6
    observations, actions = answered_once(real_redis, "env")
    assert len(observations) == 300 + evaluated["STEPS"] + 60
    assert len(delivered(observations, actions)) == 12  # every training and evaluation env
    replies = Counter((m["COMPONENT_ID"], m["OBS_ID"]) for _, m in read(real_redis, "rl:logits"))
    assert set(replies.values()) == {1} and len(replies) == 2 * len(observations)
    learned_once(real_redis, ["m1", "m2"], settings.n_steps)


def test_arrived_hands_out_each_action_once_across_tickets(real_redis, redis_server_url, scripted) -> None:
    """The client API under async stepping: actions of several outstanding tickets come as they
    arrive, each once; a ticket's result() is unchanged; a ticket past its deadline times out."""
    fake = scripted(lambda message, _: None if message["ENV_ID"] == "silent" else 1)
    env = gym.make("CartPole-v1")
    spaces = Spaces(env.observation_space, env.action_space)
    client = PolicyClient(redis_server_url, timeout=1.0, spaces=spaces, client_id="api")
    obs = env.reset(seed=0)[0]
    first = client.send({"a": obs, "b": obs})
    second = client.send({"c": obs})
    got: dict[str, Any] = {}
    while len(got) < 3:
        new = client.arrived([first, second], block_ms=100)
        assert not set(new) & set(got)
        got.update(new)
    assert got == {"a": 1, "b": 1, "c": 1} and first.result() == {"a": 1, "b": 1}
    assert first.spent and second.spent and client.arrived([first, second]) == {}
    stuck = client.send({"silent": obs})
    with pytest.raises(ActionTimeout) as raised:
        while True:
            client.arrived([stuck], block_ms=200)
    assert raised.value.env_id == "silent" and len(fake.seen) == 4
    client.close()


def _wait_drained(client: redis.Redis, models: list[str], timeout: float = 60.0) -> None:
    """Until every model committed all it read (a reply the aggregator did not wait for included)."""
    deadline = time.monotonic() + timeout
    while not drained(client, Streams("rl"), models):
        assert time.monotonic() < deadline, "the models did not drain"
        time.sleep(0.05)

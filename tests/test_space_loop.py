"""Every action space through a real redis-server: the client in each mode (actions clipped for
the caller, the sample on the wire, binary observations, local normalization), and the environment
runner on Pendulum and a custom Dict env (the aggregator's rules: tests/test_space_aggregator.py)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import redis

from tests.components import aggregator, model, running
from tests.helpers import read
from tests.scripted import statuses
from worker.client import PolicyClient
from worker.env.runner import EnvRunner, EnvSettings
from worker.model.loop import ModelWorker
from worker.model.policy import evaluate, load_weight_vector, policy_from_spec
from worker.model.settings import ModelSettings
from worker.protocol import Family

TINY = {"pi": [8], "vf": [8]}
VECTOR = {"type": "Box", "shape": [3], "dtype": "float32", "low": None, "high": None}
BOX = {"type": "Box", "shape": [4], "dtype": "float32", "low": [-1, 0, -2, -0.5], "high": [1, 0.5, 2, 0.5]}
SQUARE = {**BOX, "shape": [2, 2], "low": [[-1, 0], [-2, -0.5]], "high": [[1, 0.5], [2, 0.5]]}
MULTI = {"type": "MultiDiscrete", "nvec": [3, 2]}
CAMERA = {"type": "Box", "shape": [36, 36, 1], "dtype": "uint8", "low": 0, "high": 255}
SPEED = {"type": "Box", "shape": [2], "dtype": "float32", "low": -5, "high": 5}
IMAGE = {"type": "Dict", "spaces": {"camera": CAMERA, "speed": SPEED}}


def spaces(observation: dict[str, Any], action: dict[str, Any]) -> str:
    return json.dumps({"observation": observation, "action": action})


def unbin(value: dict[str, Any]) -> np.ndarray:
    """A binary array of a msgpack entry as numpy."""
    assert isinstance(value, dict) and isinstance(value["data"], bytes), value
    return np.frombuffer(value["data"], np.dtype(value["dtype"]).newbyteorder("<")).reshape(value["shape"])


# --------------------------------------------------------------------------- the client in each mode


def vec(k: int) -> list[float]:
    return [0.1 * k, -0.5, 0.2 * (k % 3)]


def workers(settings: ModelSettings, mode: str, spec: str, **changes: Any) -> tuple[list[ModelWorker], list]:
    """The models a client in ``mode`` asks (two in the ensemble, else one) and every component to run."""
    ids = ("m1", "m2") if mode == "ensemble" else ("m1",)
    models = [model(settings, c, seed=k, spaces=spec, net_arch=TINY, **changes) for k, c in enumerate(ids)]
    return models, [*models, aggregator(settings.redis_url)] if mode == "ensemble" else models


def learned(models: list[ModelWorker], n: int) -> None:
    """Wait until every model took in ``n`` transitions (or rejected steps); none may be rejected."""
    deadline = time.monotonic() + 10
    while any(m.counters.transitions + m.counters.dead < n for m in models) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(m.counters.transitions, m.counters.dead) for m in models] == [(n, 0)] * len(models)


def client_for(url: str, mode: str, **options: Any) -> PolicyClient:
    target = {} if mode == "ensemble" else {"model": "m1"}
    return PolicyClient(url, timeout=10.0, mode=mode, client_id="c", trim_replies=False, **target, **options)


def inbox(mode: str) -> str:
    return "rl:observation" if mode == "ensemble" else "rl:model:m1:observation"


@pytest.mark.parametrize("action", [BOX, MULTI], ids=["box", "multidiscrete"])
@pytest.mark.parametrize("mode", ["ensemble", "direct", "local"])
def test_actions_fit_the_space_and_the_sample_is_reported(real_redis, settings, mode, action) -> None:
    models, components = workers(settings, mode, spaces(VECTOR, action), log_std_init=2.0)
    with running(*components):
        with client_for(settings.redis_url, mode, flush_every=1) as client:
            space = client.spaces.action
            returned = [client.act("e", vec(0))] + [client.act("e", vec(k), reward=1.0) for k in range(1, 8)]
        learned(models, 7)  # the models learn from the samples, unclipped
    steps = read(real_redis, inbox(mode))
    assert [m["STEP"] for _, m in steps] == list(range(1, 9))
    for _, message in steps:  # msgpack binary arrays, in the space's own type
        assert unbin(message["OBSERVATION"]).dtype == np.float32
        np.testing.assert_array_equal(unbin(message["OBSERVATION"]), np.float32(vec(message["STEP"] - 1)))
    reported = [np.asarray(m["ACTION"]) for _, m in steps[1:]]
    for given, sample in zip(returned, reported, strict=False):
        assert isinstance(given, np.ndarray) and given.shape == space.shape and space.contains(given), given
        if isinstance(space, gym.spaces.Box):
            assert given.dtype == np.float32 and sample.size == given.size
            clipped = np.clip(np.float32(sample).reshape(space.shape), space.low, space.high)
            np.testing.assert_array_equal(given, clipped)
        else:
            assert given.dtype.kind == "i" and sample.tolist() == given.tolist()
    if isinstance(space, gym.spaces.Box):  # std e^2 against bounds of about 1: clipping happened
        assert sum(not space.contains(np.float32(s)) for s in reported) >= len(reported) - 1
    if mode != "local":  # the ACTION reported is exactly the one answered
        answers = {m["OBS_ID"]: m["ACTION"] for _, m in read(real_redis, "rl:action:c")}
        for (obs_id, _), sample in zip(steps, reported, strict=False):
            np.testing.assert_array_equal(np.float32(answers[obs_id]), np.float32(sample))


def test_a_box_action_of_two_dimensions_is_learned(real_redis, settings) -> None:
    """The sample, of the space's shape on the way back, is learned from (a2c.py's buffer flattens it)."""
    models, components = workers(settings, "local", spaces(VECTOR, SQUARE), log_std_init=2.0)
    with running(*components):
        with client_for(settings.redis_url, "local", flush_every=1) as client:
            returned = [client.act("e", vec(0))] + [client.act("e", vec(k), reward=1.0) for k in range(1, 4)]
            assert all(a.shape == (2, 2) and client.spaces.action.contains(a) for a in returned)
        learned(models, 3)


@pytest.mark.parametrize("mode", ["ensemble", "direct", "local"])
def test_dict_observation_with_an_image_goes_as_binary_arrays(real_redis, settings, mode) -> None:
    models, components = workers(settings, mode, spaces(IMAGE, {"type": "MultiBinary", "n": 3}))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (36, 36, 1), dtype=np.uint8) for _ in range(3)]
    speeds = [np.array([0.5 * k, -1.0], dtype=np.float32) for k in range(3)]
    with running(*components):
        with client_for(settings.redis_url, mode, flush_every=1) as client:
            returned = [client.act("cam", {"camera": images[0], "speed": speeds[0]})]
            for k in (1, 2):
                returned.append(client.act("cam", {"camera": images[k], "speed": speeds[k]}, reward=0.5))
        learned(models, 2)
    assert all(a.shape == (3,) and a.dtype.kind == "i" and set(a.tolist()) <= {0, 1} for a in returned)
    steps = [m for _, m in read(real_redis, inbox(mode))]
    assert len(steps) == 3
    for k, message in enumerate(steps):
        camera, speed = message["OBSERVATION"]["camera"], message["OBSERVATION"]["speed"]
        assert (camera["dtype"], camera["shape"], len(camera["data"])) == ("uint8", [36, 36, 1], 36 * 36)
        np.testing.assert_array_equal(unbin(camera), images[k])
        np.testing.assert_array_equal(unbin(speed), speeds[k])
    assert [m["ACTION"] for m in steps[1:]] == [a.tolist() for a in returned[:2]]


def test_a_dict_keys_floats_travel_in_the_spaces_type(real_redis, settings) -> None:
    _, components = workers(settings, "direct", spaces(IMAGE, {"type": "Discrete", "n": 2}))
    with running(*components), client_for(settings.redis_url, "direct") as client:
        client.act("cam", {"camera": np.zeros((36, 36, 1), np.uint8), "speed": [0.5, -1.0]})
    [(_, message)] = read(real_redis, inbox("direct"))
    assert message["OBSERVATION"]["speed"]["dtype"] == "float32"


def test_local_mode_acts_with_the_published_normalization(real_redis, settings) -> None:
    wide = {"type": "Box", "shape": [2], "dtype": "float32", "low": -100, "high": 100}
    spec = spaces(VECTOR, wide)
    (worker,), _ = workers(settings, "local", spec, normalize_obs=True, n_steps=2, ortho_init=False)
    probe = np.array([45.0, -30.0, -10.0], dtype=np.float32)
    with client_for(settings.redis_url, "local", flush_every=1, max_lag=4) as client:
        with running(worker) as run:
            client.act("e", [30.0, -20.0, 5.0])
            for k in range(1, 20):
                client.act("e", [30.0 + k, -20.0 + 0.5 * k, 5.0 - k], reward=1.0)
            learned([worker], 19)
            run.stop(0)  # the policy hash stays as it is from here on
        published = real_redis.hgetall("rl:model:m1:policy")
        client.act("probe", probe, deterministic=True)  # flushes: the copy takes the newest weights
        acted = client.act("probe", probe, deterministic=True)
        assert client.core.local.published_updates == int(published[b"updates"]) > 0
    mean, var, count = msgpack.unpackb(published[b"normalization"], raw=False)["obs"][""]
    mean, var = np.frombuffer(mean, "<f8"), np.frombuffer(var, "<f8")
    assert count > 1 and mean[0] > 10  # the statistics moved to the observations
    policy = policy_from_spec(json.loads(published[b"spec"]))
    load_weight_vector(policy, np.frombuffer(published[b"weights"], "<f4").copy())
    family = Family.of(gym.spaces.Box(-100, 100, (2,)))
    scaled = np.clip((probe - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32)
    expected = evaluate(policy, family, scaled[None])[0][0, :2]
    raw = evaluate(policy, family, probe[None])[0][0, :2]
    np.testing.assert_allclose(acted, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(acted, raw, rtol=1e-3), (acted, raw)  # normalization made a difference


# --------------------------------------------------------------------------- the environment runner


APPLIED: list[np.ndarray] = []  # every action the custom environment was given


class PointEnv(gym.Env):
    """Four steps of guessing a point: reward -|action - pos|^2; a Dict observation (Box, Discrete)."""

    observation_space = gym.spaces.Dict(
        {"pos": gym.spaces.Box(-1, 1, (2,), np.float32), "phase": gym.spaces.Discrete(3)}
    )
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.t, self.pos = 0, self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"pos": self.pos, "phase": 0}, {}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        APPLIED.append(np.array(action, copy=True))
        reward = -float(np.sum((action - self.pos) ** 2))
        self.t, self.pos = self.t + 1, self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"pos": self.pos, "phase": self.t % 3}, reward, self.t >= 4, False, {}


POINT = "SpaceLoopPoint-v0"
if POINT not in gym.registry:
    gym.register(POINT, entry_point=PointEnv)


def pairs(client: redis.Redis) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each environment's consecutive observations: (a step's, the next, with its REWARD and ACTION)."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for _, message in read(client, "rl:observation"):
        chains.setdefault(message["ENV_ID"], []).append(message)
    return [pair for chain in chains.values() for pair in zip(chain, chain[1:], strict=False)]


def play(
    settings: ModelSettings, env_settings: EnvSettings, gym_env: str, episodes: int, **changes: Any
) -> tuple[dict[str, Any], ModelWorker]:
    """One run of ``episodes`` episodes of ``gym_env`` against a model and the aggregator."""
    url = settings.redis_url
    worker = model(settings, "m1", gym_env=gym_env, net_arch=TINY, log_std_init=1.0)
    kept = env_settings.model_copy(update={"gym_env": gym_env, "trim_replies": False, **changes})
    with running(worker, aggregator(url)):
        runner = EnvRunner(kept, redis.Redis.from_url(url))
        report = runner.run("play", episodes=episodes)
        runner.client.close()
    assert "ERROR" not in report and report["EPISODES"] >= episodes and len(report["RETURNS"]) == episodes
    assert worker.counters.transitions > 0 and worker.counters.dead == 0
    return report, worker


def test_runner_plays_pendulum_end_to_end(real_redis, settings, env_settings) -> None:
    report, _ = play(settings, env_settings, "Pendulum-v1", 2, max_episode_steps=10)
    episodes = [s for s in statuses(real_redis) if s["EVENT"] == "episode"]
    assert [e["LENGTH"] for e in episodes] == [10] * len(episodes)
    assert report["RETURNS"] == [e["RETURN"] for e in episodes[:2]]
    assert all(-16.3 * 10 <= r <= 0 for r in report["RETURNS"])
    answers = {m["OBS_ID"]: m for _, m in read(real_redis, "rl:action:env")}
    assert len(answers) == real_redis.xlen("rl:observation")
    assert all(a["MODELS"] == 1 and len(a["ACTION"]) == 1 for a in answers.values())
    samples = []
    for before, after in pairs(real_redis):
        # Pendulum's cost, from the state before the step and the torque applied (clipped to 2).
        cos, sin, speed = unbin(before["OBSERVATION"]).astype(np.float64)
        torque = float(np.clip(after["ACTION"][0], -2.0, 2.0))
        cost = math.atan2(sin, cos) ** 2 + 0.1 * speed**2 + 0.001 * torque**2
        assert after["REWARD"] == pytest.approx(-cost, rel=1e-4, abs=1e-5), (before, after)
        samples.append(after["ACTION"][0])
    assert len(samples) >= 18 and any(abs(a) > 2.0 for a in samples)  # reported unclipped


def test_runner_plays_a_custom_dict_environment(real_redis, settings, env_settings) -> None:
    APPLIED.clear()
    report, _ = play(settings, env_settings, POINT, 3)
    episodes = [s for s in statuses(real_redis) if s["EVENT"] == "episode"]
    assert all(e["LENGTH"] == 4 for e in episodes) and all(r <= 0 for r in report["RETURNS"])
    assert len(APPLIED) == report["STEPS"]
    assert all(a.dtype == np.float32 and a.shape == (2,) and np.abs(a).max() <= 1 for a in APPLIED)
    outside = 0
    for before, after in pairs(real_redis):
        assert type(before["OBSERVATION"]["phase"]) is int
        sample = np.float32(after["ACTION"])
        outside += int(np.abs(sample).max() > 1)
        expected = -float(np.sum((np.clip(sample, -1, 1) - unbin(before["OBSERVATION"]["pos"])) ** 2))
        assert after["REWARD"] == pytest.approx(expected, rel=1e-5, abs=1e-6)  # given the clipped action
    assert outside > 0  # reported unclipped

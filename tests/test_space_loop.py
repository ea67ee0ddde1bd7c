"""Every action space through a real redis-server: the aggregator's rule per space and its
contributions, the client in each mode (actions clipped for the caller, the sample on the wire, binary
observations, local normalization), and the environment runner on Pendulum and a custom Dict env."""

from __future__ import annotations

import json
import math
import time
from statistics import NormalDist
from typing import Any

import gymnasium as gym
import msgpack
import numpy as np
import pytest
import redis

from tests.components import aggregator, model, running
from tests.helpers import read
from tests.scripted import statuses
from worker.aggregator import Aggregator
from worker.client import PolicyClient
from worker.env.runner import EnvRunner, EnvSettings
from worker.model.loop import ModelWorker
from worker.model.policy import evaluate, load_weight_vector, policy_from_spec
from worker.model.settings import ModelSettings
from worker.protocol import Encoding, Family, encode_entry

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


# --------------------------------------------------------------------------- the aggregator, by hand


def started(client: redis.Redis, url: str, models: Any, **changes: Any) -> Aggregator:
    """An aggregator awaiting ``models`` (registered live) for up to 10 s."""
    client.zadd("rl:models", {c: time.time() for c in models})
    agg = aggregator(url, **{"deadline_ms": 10_000, **changes})
    agg.start()
    return agg


def send(client: redis.Redis, obs_id: str, cid: str, dist: dict[str, Any], greedy: bool = True) -> None:
    """A model's reply to ``obs_id`` carrying ``dist`` (LOGITS, or MEAN and LOG_STD)."""
    message = {**dist, "COMPONENT_ID": cid, "DETERMINISTIC": greedy, "ENV_ID": "e", "OBS_ID": obs_id}
    client.xadd("rl:logits", encode_entry(message, Encoding.MSGPACK))


def decided(agg: Aggregator, n: int) -> list[dict[str, Any]]:
    """The next ``n`` decisions, in OBS_ID order."""
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 20
    while len(out) < n and time.monotonic() < deadline:
        out.update((a["OBS_ID"], a) for a in agg.step())
    assert len(out) == n, f"{len(out)} of {n} decided"
    return [out[k] for k in sorted(out, key=lambda i: int(i.split("-")[1]))]


def contributions(client: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall("rl:contribution").items()}


def normalized(likelihood: dict[str, float]) -> dict[str, float]:
    return {c: v / sum(likelihood.values()) for c, v in likelihood.items()}


def probs(logits: list[float]) -> list[float]:
    z = [math.exp(x) for x in logits]
    return [x / sum(z) for x in z]


GAUSSIANS = {
    "m1": ([1.0, -2.0], [0.0, -0.5]),
    "m2": ([3.0, 0.0], [0.5, 0.0]),
    "m3": ([-1.0, 4.0], [-1.0, 0.3]),
}


@pytest.mark.parametrize("combine", ["prob", "logits"])
def test_box_deterministic_decision_and_its_contributions(real_redis, redis_server_url, combine) -> None:
    agg = started(real_redis, redis_server_url, GAUSSIANS, combine=combine)
    for cid, (mean, log_std) in GAUSSIANS.items():
        send(real_redis, "1-1", cid, {"MEAN": mean, "LOG_STD": log_std})
    [action] = decided(agg, 1)
    means, log_stds = (np.array([g[k] for g in GAUSSIANS.values()]) for k in (0, 1))
    precision = np.exp(-2 * log_stds)  # prob: the mixture's mean; logits: the precision-weighted mean
    expected = means.mean(0) if combine == "prob" else (precision * means).sum(0) / precision.sum(0)
    assert action["MODELS"] == 3 and action["DETERMINISTIC"] is True
    assert action["ACTION"] == pytest.approx(expected.tolist(), rel=1e-12, abs=1e-12)
    likelihood = {
        cid: math.prod(NormalDist(m, math.exp(s)).pdf(a) for a, m, s in zip(expected, mu, ls, strict=True))
        for cid, (mu, ls) in GAUSSIANS.items()
    }
    assert contributions(real_redis) == pytest.approx(normalized(likelihood), rel=1e-9)


def test_box_samples_come_from_the_mixture(real_redis, redis_server_url) -> None:
    """combine=prob: a sample picks one model (for the whole vector) and draws from its Gaussian."""
    agg, n = started(real_redis, redis_server_url, ("m1", "m2"), combine="prob"), 400
    for k in range(n):
        send(real_redis, f"1-{k}", "m1", {"MEAN": [-5.0, -5.0], "LOG_STD": [-3.0, -3.0]}, greedy=False)
        send(real_redis, f"1-{k}", "m2", {"MEAN": [5.0, 5.0], "LOG_STD": [-3.0, -3.0]}, greedy=False)
    actions = np.array([a["ACTION"] for a in decided(agg, n)])
    assert actions.shape == (n, 2) and (np.abs(np.abs(actions) - 5.0) < 0.5).all(), actions
    assert (np.sign(actions[:, 0]) == np.sign(actions[:, 1])).all()  # one model draws the whole vector
    high = int((actions[:, 0] > 0).sum())
    assert 140 <= high <= 260, high  # Binomial(400, 1/2): 6 standard deviations
    # The model that drew the sample made it likely, the other not at all: it gets the whole share.
    assert contributions(real_redis) == pytest.approx({"m1": n - high, "m2": high}, abs=1e-6)


def test_box_samples_with_logits_have_the_combined_precision(real_redis, redis_server_url) -> None:
    agg, n = started(real_redis, redis_server_url, ("m1", "m2"), combine="logits"), 400
    for k in range(n):
        send(real_redis, f"1-{k}", "m1", {"MEAN": [0.0], "LOG_STD": [0.0]}, greedy=False)
        send(real_redis, f"1-{k}", "m2", {"MEAN": [3.0], "LOG_STD": [math.log(0.5)]}, greedy=False)
    samples = np.array([a["ACTION"][0] for a in decided(agg, n)])
    # precision 1 and 4: mean (0 * 1 + 3 * 4) / 5 = 2.4, standard deviation mean(1, 4) ** -0.5
    assert abs(samples.mean() - 2.4) < 0.15 and abs(samples.std() / 2.5**-0.5 - 1) < 0.15


MULTIS = {
    "MultiDiscrete": {"m1": [[3.0, 0.0, 0.0], [0.0, 1.0]], "m2": [[0.0, 2.8, -10.0], [0.0, 1.5]]},
    "MultiBinary": {"m1": [[0, 2.0], [0, -1.0], [0, 0.5]], "m2": [[0, -1.0], [0, -2.0], [0, -0.7]]},
}


@pytest.mark.parametrize("combine", ["prob", "logits"])
@pytest.mark.parametrize("kind", list(MULTIS))
def test_multi_spaces_combine_each_dimension(real_redis, redis_server_url, kind, combine) -> None:
    logits = MULTIS[kind]
    agg = started(real_redis, redis_server_url, logits, combine=combine)
    expected = []
    for dims in zip(*logits.values(), strict=True):  # one dimension: each model's logits, by hand
        if combine == "prob":
            p = [sum(q) / 2 for q in zip(*(probs(row) for row in dims), strict=True)]
        else:
            p = probs([sum(x) / 2 for x in zip(*dims, strict=True)])
        expected.append(p.index(max(p)))
    if kind == "MultiDiscrete":  # the two rules disagree in the first dimension
        assert expected == ([1, 1] if combine == "prob" else [0, 1])
    for cid, rows in logits.items():
        send(real_redis, "1-0", cid, {"LOGITS": rows})
    [first] = decided(agg, 1)
    assert first["ACTION"] == expected and first["MODELS"] == 2
    # Its shares, by hand: each model's probability of the chosen values, normalized.
    likelihood = {
        c: math.prod(probs(r)[a] for r, a in zip(rows, expected, strict=True)) for c, rows in logits.items()
    }
    assert contributions(real_redis) == pytest.approx(normalized(likelihood), rel=1e-9)
    for k in range(1, 31):
        for cid, rows in logits.items():
            send(real_redis, f"1-{k}", cid, {"LOGITS": rows}, greedy=False)
    sizes = [len(row) for row in logits["m1"]]
    for action in decided(agg, 30):
        assert len(action["ACTION"]) == len(sizes)
        assert all(type(a) is int and 0 <= a < n for a, n in zip(action["ACTION"], sizes, strict=True))
    assert sum(contributions(real_redis).values()) == pytest.approx(31)


def test_a_reply_of_another_form_is_dead_lettered(real_redis, redis_server_url) -> None:
    agg = started(real_redis, redis_server_url, ("m1", "m2", "m3"))
    box, multi = {"MEAN": [0.0, 1.0], "LOG_STD": [0.0, 0.0]}, {"LOGITS": [[0.0, 1.0, 2.0], [0.0, 1.0]]}
    send(real_redis, "1-1", "m1", box)
    send(real_redis, "1-1", "m2", {"MEAN": [0.0, 1.0, 2.0], "LOG_STD": [0.0, 0.0, 0.0]})
    send(real_redis, "1-1", "m3", {"LOGITS": [[0.0, 1.0], [0.0, 1.0]]})
    send(real_redis, "1-2", "m1", multi)
    send(real_redis, "1-2", "m2", {"LOGITS": [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]})
    send(real_redis, "1-2", "m3", {"LOGITS": [0.0, 1.0]})
    assert agg.step() == []
    dead = real_redis.xrange("rl:dead")
    assert [f[b"dead:stream"] for _, f in dead] == [b"rl:logits"] * 4
    reasons = [f[b"dead:reason"].decode() for _, f in dead]
    shown = [
        "MEAN and LOG_STD of 3",
        "LOGITS of dimensions [2, 2]",
        "LOGITS of dimensions [3, 3]",
        "LOGITS of 2",
    ]
    gave = ["MEAN and LOG_STD of 2 values"] * 2 + ["LOGITS of dimensions [3, 2]"] * 2
    for reason, found, expected in zip(reasons, shown, gave, strict=True):
        assert f"the reply is {found}" in reason and f"other models gave {expected}" in reason, reason
    for cid in ("m2", "m3"):
        send(real_redis, "1-1", cid, box)
        send(real_redis, "1-2", cid, multi)
    first, second = decided(agg, 2)
    assert (first["MODELS"], second["MODELS"]) == (3, 3)
    assert first["ACTION"] == pytest.approx([0.0, 1.0]) and second["ACTION"] == [2, 1]
    assert real_redis.xpending("rl:logits", "aggregator")["pending"] == 0


@pytest.mark.parametrize("combine", ["prob", "logits"])
def test_one_model_decides_alone(real_redis, redis_server_url, combine) -> None:
    agg = started(real_redis, redis_server_url, ("m1",), combine=combine)
    send(real_redis, "1-1", "m1", {"MEAN": [0.3, -1.2, 7.0], "LOG_STD": [0.5, -2.0, 1.0]})
    send(real_redis, "1-2", "m1", {"LOGITS": [[0.1, 0.7, -0.2], [1.0, 0.0]]})
    send(real_redis, "1-3", "m1", {"LOGITS": [0.0, -1.0, 3.0, 2.9]})
    box, multi, categorical = decided(agg, 3)
    assert box["ACTION"] == pytest.approx([0.3, -1.2, 7.0], rel=1e-12) and box["MODELS"] == 1
    assert multi["ACTION"] == [1, 0] and categorical["ACTION"] == 2
    assert contributions(real_redis) == pytest.approx({"m1": 3.0})


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

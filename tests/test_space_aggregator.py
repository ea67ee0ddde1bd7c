"""Every action space through the aggregator, on a real redis-server: its rule per space (the math
of worker/aggregator.py's docstring, computed here by hand) and each model's contribution."""

from __future__ import annotations

import math
import time
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import redis

from tests.components import aggregator
from worker.aggregator import Aggregator
from worker.protocol import Encoding, encode_entry

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

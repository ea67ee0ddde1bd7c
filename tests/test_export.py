"""A model as a stable-baselines3 ``A2C`` zip and back, through a real redis-server: an exported
model, loaded by SB3 alone, acts as the model does; a model started from a zip SB3 trained acts as
SB3 does; zips that do not fit, or that need unpickling, are refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C

from tests.components import model, running
from worker.cli import main
from worker.client import PolicyClient
from worker.common.servers import free_port
from worker.model.policy import make_policy, unpack_state
from worker.model.sb3zip import read_policy
from worker.model.store import ModelStore
from worker.protocol import Streams

SB3_NET = {"pi": [64, 64], "vf": [64, 64]}  # SB3's default network for an MlpPolicy
N = 1000

# Run with SB3 alone: nothing of this project can be imported, as in a plain SB3 install.
PLAIN_SB3 = """
import sys
sys.modules["worker"] = None
import gymnasium as gym
import numpy as np
from stable_baselines3 import A2C
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

zip_path, env_id, obs_path, out_path, *statistics = sys.argv[1:]
model = A2C.load(zip_path, device="cpu")
obs = np.load(obs_path)
if statistics:
    venv = VecNormalize.load(statistics[0], DummyVecEnv([lambda: gym.make(env_id)]))
    venv.training = False
    obs = venv.normalize_obs(obs)
np.save(out_path, model.predict(obs, deterministic=True)[0])
"""

UNPICKLED: list[str] = []  # what an Opaque's unpickling would append to


class Opaque:
    """An object only a full unpickler can rebuild; rebuilding it would be noticed."""

    def __init__(self) -> None:
        self.payload = "not a tensor"

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append("Opaque")
        self.__dict__.update(state)


def observations(env_id: str, n: int = N) -> np.ndarray:
    space = gym.make(env_id).observation_space
    space.seed(0)
    return np.stack([space.sample() for _ in range(n)])


def train(client: PolicyClient, env_id: str, steps: int = 30) -> None:
    """Steps the model learns from (sampled actions, rewards), so its weights are its own."""
    seen = observations(env_id, steps)
    client.act("train", seen[0])
    for t in range(1, steps):
        client.act("train", seen[t], reward=float(t % 3) - 1.0)


def answers(client: PolicyClient, obs: np.ndarray) -> np.ndarray:
    """The model's deterministic action for each observation, through its inbox."""
    actions = client.act_many({f"eval-{i}": o for i, o in enumerate(obs)}, deterministic=True)
    return np.array([actions[f"eval-{i}"] for i in range(len(obs))])


def direct(settings, component_id: str) -> PolicyClient:
    return PolicyClient(settings.redis_url, mode="direct", model=component_id, timeout=30.0)


def one_line(stopped: pytest.ExceptionInfo[SystemExit], says: str) -> None:
    message = str(stopped.value.code)
    assert message.startswith("error: ") and says in message and "\n" not in message, message


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    ("env_id", "normalize"),
    [("CartPole-v1", False), ("Pendulum-v1", False), ("CartPole-v1", True)],
)
def test_an_exported_model_acts_in_sb3_as_the_model_does(
    real_redis, settings, tmp_path: Path, env_id: str, normalize: bool
) -> None:
    worker = model(settings, "m1", gym_env=env_id, normalize_obs=normalize)
    obs = observations(env_id)
    zip_path = tmp_path / "model.zip"
    with running(worker), direct(settings, "m1") as client:
        train(client, env_id)
        args = ["control", "export", "--redis-url", settings.redis_url, "--component-id", "m1"]
        assert main([*args, str(zip_path)]) == 0
        mine = answers(client, obs)
    assert worker.counters.updates > 0  # the weights exported are trained ones
    statistics = tmp_path / "model.vecnormalize.pkl"
    assert statistics.exists() == normalize
    np.save(tmp_path / "obs.npy", obs)
    command = [sys.executable, "-c", PLAIN_SB3, str(zip_path), env_id, "obs.npy", "sb3.npy"]
    subprocess.run([*command, *([str(statistics)] if normalize else [])], cwd=tmp_path, check=True)
    theirs = np.load(tmp_path / "sb3.npy")
    if env_id == "Pendulum-v1":  # SB3 clips to the bounds, as the client does
        np.testing.assert_allclose(np.stack(mine), theirs, rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(mine, theirs)
        assert len(set(mine.tolist())) == 2  # both actions occur: agreeing means something
    # And back: the zip's tensors are the model's, as --init-from reads them.
    state = read_policy(zip_path, worker.settings, make_policy(worker.settings))
    for name, tensor in worker.policy.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_export_refuses_what_it_cannot_write_with_one_line(real_redis, settings, tmp_path: Path) -> None:
    args = ["control", "export", "--redis-url", settings.redis_url]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--component-id", "ghost", str(tmp_path / "ghost.zip")])
    one_line(stopped, "model 'ghost' has no checkpoint")
    with running(model(settings, "m1")):
        pass  # its first checkpoint
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--component-id", "m1", "--net-arch", '{"pi": [8], "vf": [8]}', str(tmp_path / "m.zip")])
    one_line(stopped, "--net-arch: model 'm1' has another value")
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--component-id", "m1", "--gym-env", "Acrobot-v1", str(tmp_path / "m.zip")])
    one_line(stopped, "--gym-env: model 'm1' has another value")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--component-id", "m1", str(tmp_path / "file.txt" / "m.zip")])
    one_line(stopped, "cannot write")
    assert main([*args, "--component-id", "m1", "--gym-env", "CartPole-v1", str(tmp_path / "m.zip")]) == 0
    assert not list(tmp_path.glob("*.partial"))


# --------------------------------------------------------------------------- import (--init-from)


@pytest.fixture(scope="module")
def zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Zips SB3 made: trained on CartPole-v1, fresh for Acrobot-v1; and two it could not have made."""
    folder = tmp_path_factory.mktemp("zips")
    trained = A2C("MlpPolicy", "CartPole-v1", seed=0, device="cpu").learn(500)
    trained.save(folder / "cartpole.zip")
    A2C("MlpPolicy", "Acrobot-v1", seed=0, device="cpu").save(folder / "acrobot.zip")
    with (
        zipfile.ZipFile(folder / "cartpole.zip") as source,
        zipfile.ZipFile(folder / "pickled.zip", "w") as out,
    ):
        for item in source.infolist():
            if item.filename != "policy.pth":
                out.writestr(item, source.read(item.filename))
        with out.open("policy.pth", "w") as pth:
            torch.save({"weights": Opaque()}, pth)
    (folder / "text.zip").write_text("not a zip")
    return {path.stem: path for path in folder.iterdir()}


def test_a_model_started_from_an_sb3_zip_acts_as_sb3_does(real_redis, settings, zips) -> None:
    worker = model(settings, "imp", init_from=zips["cartpole"], net_arch=SB3_NET)
    obs = observations("CartPole-v1")
    with running(worker), direct(settings, "imp") as client:
        mine = answers(client, obs)
    assert worker.restored["restored"] is False  # a new model, whose first checkpoint is the zip's
    theirs, _ = A2C.load(zips["cartpole"], device="cpu").predict(obs, deterministic=True)
    np.testing.assert_array_equal(mine, theirs)
    assert len(set(mine.tolist())) == 2
    with zipfile.ZipFile(zips["cartpole"]) as archive, archive.open("policy.pth") as pth:
        trained = torch.load(pth, weights_only=True)
    stored = ModelStore(real_redis, Streams("rl"), "imp").load()
    committed = unpack_state(stored.policy)
    assert committed.keys() == trained.keys()
    assert all(torch.equal(committed[name], trained[name]) for name in trained)


@pytest.mark.parametrize(
    ("zip_name", "flags", "says"),
    [
        (
            "acrobot",
            ["--net-arch", json.dumps(SB3_NET)],
            "observation space is Box((6,), float32), this model's",
        ),
        (
            "cartpole",
            [],
            "in the zip, (16, 4) in this model; the zip's network is --net-arch '" + json.dumps(SB3_NET),
        ),
        (
            "cartpole",
            ["--net-arch", json.dumps(SB3_NET), "--activation-fn", "relu"],
            "its activation is tanh",
        ),
        ("pickled", ["--net-arch", json.dumps(SB3_NET)], "policy.pth cannot be read without unpickling"),
        ("text", [], "not a stable-baselines3 zip"),
    ],
)
def test_a_zip_that_does_not_fit_is_refused_with_one_line(
    zips, zip_name: str, flags: list[str], says: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # never reached: the model cannot be built
    with pytest.raises(SystemExit) as stopped:
        main(
            ["model", "--redis-url", url, "--component-id", "m1", "--init-from", str(zips[zip_name]), *flags]
        )
    one_line(stopped, says)
    assert UNPICKLED == []  # the pickled policy.pth was refused, not rebuilt


def test_a_checkpoint_wins_over_init_from(real_redis, settings, zips, capsys) -> None:
    first = model(settings, "m1", net_arch=SB3_NET)
    first.start()
    committed = first.learner.weights()
    first.shutdown()
    capsys.readouterr()
    second = model(settings, "m1", net_arch=SB3_NET, init_from=zips["cartpole"])
    second.start()
    second.start()  # again, as after an outage: still said once
    assert second.restored["restored"] is True
    assert np.array_equal(second.learner.weights(), committed)
    assert capsys.readouterr().err.count("--init-from not used: the model has a checkpoint, which wins") == 1
    second.shutdown()
    assert not real_redis.exists("rl:model:m1:lease")

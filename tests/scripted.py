"""The environment runner's test kit: a scripted aggregator that answers as the real one would, a few
policies for it, and helpers to serve a runner and read its reports."""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from tests.helpers import read, values
from worker.env.runner import EnvRunner, EnvSettings
from worker.protocol import Encoding, Streams, decode_entry, encode_entry

Message = dict[str, Any]


class ScriptedAggregator(threading.Thread):
    """Answers every observation with ``policy(message, step_of_its_env)``; ``None`` answers nothing.

    It answers where the observation asks (REPLY_TO), as the aggregator does; before each answer it
    also publishes there an action for another observation, which the runner under test must ignore.
    """

    def __init__(self, url: str, policy: Callable[[Message, int], Any]) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.policy = policy
        self.seen: list[tuple[str, Message]] = []
        self.answers: dict[str, Any] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        cursor, steps = "0-0", defaultdict(int)
        while not self.halt.is_set():
            for _, items in self.client.xread({"rl:observation": cursor}, block=20) or []:
                for raw_id, fields in items:
                    cursor = raw_id.decode()
                    message, encoding = decode_entry(fields, 1 << 20)
                    self.seen.append((cursor, message))
                    action = self.policy(message, steps[message["ENV_ID"]])
                    steps[message["ENV_ID"]] += 1
                    if action is None:
                        continue
                    self.answers[cursor] = action
                    replies = Streams().replies(message.get("REPLY_TO"))
                    other = {"ACTION": 1, "ENV_ID": "other-0", "OBS_ID": "1-1", "MODELS": 1}
                    self.client.xadd(replies, encode_entry(other, Encoding.MSGPACK))
                    reply = {"ACTION": action, "ENV_ID": message["ENV_ID"], "OBS_ID": cursor, "MODELS": 1}
                    reply["DETERMINISTIC"] = message.get("DETERMINISTIC", False)
                    self.client.xadd(replies, encode_entry(reply, encoding))

    def by_env(self) -> dict[str, list[tuple[str, Message]]]:
        out: dict[str, list[tuple[str, Message]]] = defaultdict(list)
        for obs_id, message in self.seen:
            out[message["ENV_ID"]].append((obs_id, message))
        return out


@pytest.fixture
def env_settings(redis_server_url: str) -> EnvSettings:
    return EnvSettings(
        _cli_parse_args=False, redis_url=redis_server_url, n_envs=2, seed=0, action_timeout=5.0, block_ms=50
    )


@pytest.fixture
def scripted(redis_server_url: str) -> Iterator[Callable[..., ScriptedAggregator]]:
    started: list[ScriptedAggregator] = []

    def start(policy: Callable[[Message, int], Any]) -> ScriptedAggregator:
        aggregator = ScriptedAggregator(redis_server_url, policy)
        aggregator.start()
        started.append(aggregator)
        return aggregator

    yield start
    for aggregator in started:
        aggregator.halt.set()
        aggregator.join(5)


def alternate(_: Message, step: int) -> int:
    return step % 2  # keeps the pole up for a while: episodes end by the time limit


def balance(message: Message, _: int) -> int:
    """Push towards where the pole falls: a function of the observation alone."""
    _, _, angle, angular_velocity = values(message["OBSERVATION"])
    return int(angle + angular_velocity > 0)


def serve(runner: EnvRunner) -> None:
    """``runner.serve()`` in this thread; it sets SIGTERM/SIGINT handlers, so pytest's come back after."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner.serve()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def statuses(client: redis.Redis) -> list[Message]:
    return [message for _, message in read(client, "rl:status")]


@contextmanager
def failing(client: redis.Redis, fault: Callable[[str], None]) -> Iterator[None]:
    """Within the block, ``fault(command)`` runs before each command ``client`` sends: it raises to
    make that command fail as Redis would, before it reaches Redis."""
    execute = client.execute_command

    def faulty(*args: Any, **options: Any) -> Any:
        fault(args[0])
        return execute(*args, **options)

    client.execute_command = faulty  # type: ignore[method-assign]
    try:
        yield
    finally:
        client.execute_command = execute  # type: ignore[method-assign]

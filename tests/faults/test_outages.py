"""What Redis can do to running components, with a real redis-server: refuse writes for a while
(out of memory under ``noeviction``, a long script, loading its data after a restart), lose a
reply, come back empty or from an older snapshot, evict keys. A refusal is an outage: a component
backs off, keeps its state, logs ``redis unavailable, retrying`` once per outage (each attempt at
debug level) and goes on once Redis takes writes again, every entry answered exactly once.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from tests.faults.chaos import Incarnation, RedisServer, spawn, worker_command
from tests.helpers import read
from tests.scripted import ScriptedAggregator
from worker.aggregator import Aggregator, AggregatorSettings
from worker.common import logs
from worker.common.connections import connect
from worker.common.serve import Outages, Service, is_outage
from worker.common.servers import embedded_redis
from worker.control.train import run_episodes, wait_for_loop, wait_for_models
from worker.env.runner import EnvRunner, EnvSettings
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings
from worker.model.store import ModelStore, digest
from worker.protocol import Encoding, Streams, encode_entry

pytestmark = [pytest.mark.redis_server]
STREAMS = Streams("rl")
OUTAGE = "redis unavailable, retrying"
SPIN = """local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local stop = ms() + tonumber(ARGV[1]) while ms() < stop do end return 1"""  # busy for ARGV[1] ms
BUSY = redis.ResponseError("BUSY Redis is busy running a script")
RESET = redis.ConnectionError("connection reset")


@pytest.fixture
def url() -> Iterator[str]:  # a private Redis: these tests change its configuration
    with embedded_redis() as url:
        yield url


def until(condition: Callable[[], Any], what: str, check: Callable[[], None] = lambda: None) -> None:
    """Wait for ``condition()``, calling ``check()`` (which asserts nothing died) as it goes."""
    deadline = time.monotonic() + 120
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def obs(env: str, reward: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {"OBSERVATION": np.random.uniform(-0.1, 0.1, 4).tolist(), "ENV_ID": env}
    return message | ({"REWARD": 1.0, "ACTION": 0} if reward else {})


def unanswered(client: redis.Redis, models: list[str], once: bool = False, decided: bool = False) -> int:
    """Replies missing (each observation, each model); with ``once``, assert none came twice and
    nothing is pending, and with ``decided`` the same of the actions. Returns 0 or the missing."""
    observed = [i.decode() for i, _ in client.xrange(STREAMS.observation)]
    got = Counter((m["COMPONENT_ID"], m["OBS_ID"]) for _, m in read(client, STREAMS.logits))
    if once:
        assert set(got) == {(m, i) for m in models for i in observed} and max(got.values()) == 1
        assert all(client.xpending(STREAMS.observation, Streams.group(m))["pending"] == 0 for m in models)
    if decided:  # a runner r answered on its own stream (it must keep it), anyone else on the shared one
        replies = [*read(client, STREAMS.action), *read(client, STREAMS.replies("r"))]
        actions = Counter(m["OBS_ID"] for _, m in replies)
        assert set(actions) == set(observed) and max(actions.values()) == 1
        assert client.xpending(STREAMS.logits, "aggregator")["pending"] == 0
    return sum(not got[(m, i)] for m in models for i in observed)


@contextmanager
def serving(service: Service) -> Iterator[Callable[[], None]]:
    """``service.serve()`` in a thread; yields a check that it did not crash; stops it after."""
    crashed: list[BaseException] = []

    def serve() -> None:
        try:
            service.serve()
        except BaseException as exc:  # reported by check()
            crashed.append(exc)

    def check() -> None:
        assert not crashed, repr(crashed)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield check
    finally:
        service.stop()
        thread.join(30)
    check()


def answering(stack: ExitStack, url: str) -> ScriptedAggregator:
    """Action 0 for every observation, until ``stack`` closes."""
    fake = ScriptedAggregator(url, lambda *_: 0)
    fake.start()
    stack.callback(lambda: (fake.halt.set(), fake.join(5)))
    return fake


def ready(lines: list[dict]) -> Callable[[], bool]:
    return lambda: any(e["event"] == "ready" for e in lines)


# --------------------------------------------------------------------------- each component, in-process

Setup = tuple[Service, list[tuple[str, dict]], Callable[[], bool]]  # the component, its input, done?


def model(url: str, client: redis.Redis, stack: ExitStack) -> Setup:
    settings = ModelSettings(_cli_parse_args=False, redis_url=url, component_id="m1", block_ms=50)
    inputs = [(STREAMS.observation, encode_entry(obs(f"e{k}", False), Encoding.JSON)) for k in range(3)]
    done = lambda: not unanswered(client, ["m1"]) and not unanswered(client, ["m1"], once=True)  # noqa: E731
    return ModelWorker(settings, connect(url)), inputs, done


def aggregator(url: str, client: redis.Redis, stack: ExitStack) -> Setup:
    client.zadd(STREAMS.registry, {"m1": time.time() + 3600})  # live throughout
    reply = {"LOGITS": [0.0, 1.0], "COMPONENT_ID": "m1", "ENV_ID": "e"}
    inputs = [(STREAMS.logits, encode_entry(reply | {"OBS_ID": f"1-{k}"}, Encoding.JSON)) for k in range(3)]

    def done() -> bool:
        actions = Counter(m["OBS_ID"] for _, m in read(client, STREAMS.action))
        assert set(actions) <= {"1-0", "1-1", "1-2"} and max(actions.values(), default=1) == 1
        return len(actions) == 3 and client.xpending(STREAMS.logits, "aggregator")["pending"] == 0

    settings = AggregatorSettings(_cli_parse_args=False, redis_url=url, seed=0, block_ms=20)
    return Aggregator(settings, connect(url)), inputs, done


def runner(url: str, client: redis.Redis, stack: ExitStack) -> Setup:
    fake = answering(stack, url)
    settings = EnvSettings(_cli_parse_args=False, redis_url=url, n_envs=2, seed=0, block_ms=50)
    run = {"CMD": "RUN", "RUN_ID": "r1", "STEPS": 4}

    def done() -> bool:  # the report, no round published twice
        reports = [m for _, m in read(client, STREAMS.status) if m.get("EVENT") == "run"]
        assert all("ERROR" not in r for r in reports)
        return bool(reports) and client.xlen(STREAMS.observation) == len(fake.answers) == 4

    return EnvRunner(settings, connect(url)), [(STREAMS.control, encode_entry(run, Encoding.JSON))], done


@pytest.mark.parametrize("make", [model, aggregator, runner])
def test_a_component_rides_out_redis_out_of_memory(url: str, make) -> None:
    """Its input arrives as Redis runs out of memory (one transaction): it reads it, its write is
    refused, then its restart (XGROUP CREATE: the crash of the issue) or its retries are too; once
    memory is back it answers, once; the outage is logged once."""
    client = redis.Redis.from_url(url)
    with ExitStack() as stack, capture_logs() as lines:
        service, inputs, done = make(url, client, stack)
        with serving(service) as check:
            until(ready(lines), "ready", check)
            with client.pipeline(transaction=True) as pipe:
                for stream, fields in inputs:
                    pipe.xadd(stream, fields)
                pipe.config_set("maxmemory", 1)  # noeviction, the default
                pipe.execute()
            until(lambda: service.outages.failures >= 3, "refusals", check)
            client.config_set("maxmemory", 0)
            until(done, "the answers", check)
    outages = [e for e in lines if e["event"] == OUTAGE]
    assert len(outages) == 1 and "maxmemory" in outages[0]["error"], outages


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), True),
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.ResponseError("BUSY Redis is busy running a script"), True),
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's failing"), True),
        (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (redis.exceptions.MasterDownError("Link with MASTER is down"), True),
        (redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.ConnectionError("Connection refused"), True),
        (redis.AuthenticationError("invalid username-password pair"), False),  # waiting cannot mend it
        (redis.exceptions.AuthorizationError("user is disabled"), False),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    ],
)
def test_what_is_an_outage(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


def test_a_redis_that_refuses_by_turns_is_one_outage(url: str) -> None:
    """At its memory limit Redis takes one write and refuses the next: one outage, logged once."""
    refusal = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    with capture_logs() as lines:
        outages = Outages(redis.Redis.from_url(url), logs.get("test"))
        outages.attach()
        outages.backoff, outages.settle = NoBackoff(), 3600.0
        for settle in (3600.0, 3600.0, 3600.0, 0.0):  # 0: it served long enough, a new outage
            outages.settle = settle
            outages.failed(refusal)
            outages.ok()
    assert [e["event"] for e in lines] == [OUTAGE, "redis available again"] * 2
    assert lines[2]["attempt"] == 1


def fault(client: redis.Redis, error: Exception, *command: str, lost: Callable | None = None) -> list:
    """The first command starting with ``command`` fails with ``error``: refused (not run), or run
    but its reply lost (the first for which ``lost(reply)``), inside redis-py's retries."""
    execute, parse, failed = client.execute_command, client.parse_response, []

    def refuse(*args: Any, **options: Any) -> Any:
        if lost is None and not failed and args[: len(command)] == command:
            failed.append(args)
            raise error
        return execute(*args, **options)

    def lose(connection: Any, name: str, **options: Any) -> Any:
        reply = parse(connection, name, **options)
        if lost is not None and not failed and (name,) == command and lost(reply):
            failed.append(reply)
            raise error
        return reply

    client.execute_command, client.parse_response = refuse, lose  # type: ignore[method-assign]
    return failed


def test_the_aggregator_decides_what_a_lost_reply_delivered(url: str) -> None:
    """redis-py resends a read whose reply was lost on a new connection: the replies the first read
    delivered are pending on the aggregator, and must be decided too."""
    client = redis.Redis.from_url(url)
    with ExitStack() as stack:
        service, inputs, done = aggregator(url, client, stack)
        lost = fault(service.redis, RESET, "XREADGROUP", lost=lambda reply: reply and reply[0][1])
        with serving(service) as check:
            until(lambda: client.exists(STREAMS.logits), "the group", check)
            for stream, fields in inputs:
                client.xadd(stream, fields)
            until(done, "the decisions", check)
    assert lost


def test_a_run_rides_out_busy_as_it_begins_and_a_round_whose_reply_was_lost(url: str) -> None:
    """BUSY when the run looks where the control stream ends (an old STOP there must not count);
    a round applied but its reply lost past redis-py's retries: the round is not published twice."""
    client = redis.Redis.from_url(url)
    client.xadd(STREAMS.control, encode_entry({"CMD": "STOP"}, Encoding.JSON))  # before the run
    service = EnvRunner(
        EnvSettings(_cli_parse_args=False, redis_url=url, n_envs=2, seed=0, block_ms=50),
        connect(url, retry=Retry(NoBackoff(), 0)),  # a connection error reaches the runner
    )
    busy = fault(service.redis, BUSY, "XINFO STREAM", STREAMS.control)
    lost = fault(service.redis, RESET, "EVALSHA", lost=bool)
    with ExitStack() as stack:
        fake = answering(stack, url)
        report = service.run("r1", steps=4)
    assert busy and lost and report.get("STEPS") == 4 and "ERROR" not in report, report
    assert client.xlen(STREAMS.observation) == len(fake.seen) == 4


def test_a_training_run_waits_for_redis_to_take_its_command(url: str) -> None:
    """``control train``'s run_episodes sends its RUN once Redis takes writes again (logged once)."""
    client = redis.Redis.from_url(url)
    settings = EnvSettings(_cli_parse_args=False, redis_url=url, n_envs=1, seed=0, block_ms=50)
    result: list[dict] = []
    with ExitStack() as stack, capture_logs() as lines:
        answering(stack, url)
        with serving(EnvRunner(settings, connect(url))) as check:
            until(ready(lines), "the runner", check)
            client.config_set("maxmemory", 1)
            send = lambda: result.append(run_episodes(connect(url), STREAMS, steps=2))  # noqa: E731
            driver = threading.Thread(target=send)
            driver.start()
            until(lambda: any(e["event"] == OUTAGE for e in lines), "the refusal", check)
            client.config_set("maxmemory", 0)
            driver.join(60)
    assert result and result[0]["steps"] == 2 and [e["event"] for e in lines].count(OUTAGE) == 1


@pytest.mark.parametrize("policy", ["allkeys-lru", "noeviction"])
def test_components_warn_unless_redis_is_noeviction(url: str, policy: str) -> None:
    """Checked at start (a BUSY Redis is asked again), warned once, as a warning."""
    client = redis.Redis.from_url(url)
    client.config_set("maxmemory-policy", policy)
    for make in (model, aggregator, runner):
        with ExitStack() as stack, capture_logs() as lines:
            service = make(url, client, stack)[0]
            fault(service.redis, BUSY, "INFO")
            with serving(service) as check:
                until(ready(lines), "ready", check)
        warned = [e for e in lines if e["event"].startswith("Redis may evict keys")]
        assert len(warned) == (policy != "noeviction"), (make.__name__, warned)
        assert all(e["log_level"] == "warning" and e["maxmemory_policy"] == policy for e in warned)


# --------------------------------------------------------------------------- processes


def publish(client: redis.Redis, envs: list[str], reward: bool = True) -> None:
    """One observation per environment in one transaction: one batch for the model."""
    with client.pipeline(transaction=True) as pipe:
        for env in envs:
            pipe.xadd(STREAMS.observation, encode_entry(obs(env, reward), Encoding.MSGPACK))
        pipe.execute()


def logged(p: Incarnation, event: str, level: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of ``p`` whose event starts with ``event`` (at ``level``, if given)."""
    lines = [json.loads(raw) for raw in p.log_path.read_text().splitlines() if raw.startswith("{")]
    return [e for e in lines if e["event"].startswith(event) and level in (None, e["level"])]


@contextmanager
def running(commands: dict[str, list[str]], tmp_path: Path) -> Iterator[tuple[dict, Callable[[], None]]]:
    """The commands as processes, and a check that none exited; at the end each must stop on
    SIGTERM with exit status 0, having logged ``stopped`` and no traceback."""
    processes = {name: spawn(args, tmp_path / f"{name}.log", name) for name, args in commands.items()}

    def check() -> None:
        for name, p in processes.items():
            assert p.process.poll() is None, f"{name} exited:\n{p.log_path.read_text()[-3000:]}"

    try:
        yield processes, check
        check()
        for p in processes.values():
            p.process.terminate()
        for p in processes.values():
            code, text = p.process.wait(timeout=60), p.log_path.read_text()
            assert code == 0 and "Traceback" not in text and logged(p, "stopped"), text[-3000:]
    finally:
        for p in processes.values():
            if p.process.poll() is None:
                p.process.kill()
                p.process.wait()


def command(url: str, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "worker", name, "--redis-url", url, "--log-json", *args]


@pytest.mark.slow
def test_the_loop_rides_out_redis_running_out_of_memory(tmp_path: Path) -> None:
    """Two models, the aggregator and a runner as processes, training runs sent as control train
    sends them; maxmemory lowered under it for 3 s (every write refused), then raised again."""
    models = ["m1", "m2"]
    with embedded_redis() as url, capture_logs() as driver_log:
        client = redis.Redis.from_url(url)
        commands = {m: worker_command(url, m, "--seed", str(k)) for k, m in enumerate(models)}
        commands["aggregator"] = command(url, "aggregator", "--seed", "0")
        commands["env"] = command(
            url, "env", "--n-envs", "4", "--runner-id", "r", "--seed", "0", "--no-trim-replies"
        )
        with running(commands, tmp_path) as (processes, check):
            wait_for_models(client, STREAMS, 2)
            wait_for_loop(client, STREAMS, ["r"], since=0)
            reports = [run_episodes(connect(url), STREAMS, steps=40, timeout=120) for _ in range(2)]
            # During the next runs, 3 s a little below what it uses (which varies by some 60 kB):
            # every write refused throughout.
            low = client.info("memory")["used_memory"] - 256 * 1024
            for delay, limit in ((0.2, low), (3.2, 0)):
                threading.Timer(delay, client.config_set, ("maxmemory", limit)).start()
            reports += [run_episodes(connect(url), STREAMS, steps=400, timeout=120) for _ in range(4)]
            until(lambda: not unanswered(client, models), "every reply", check)
        assert not unanswered(client, models, once=True, decided=True)
        runs = [m for _, m in read(client, STREAMS.status) if m.get("EVENT") == "run"]
        assert len(runs) == len(reports) and not [m for m in runs if "ERROR" in m]
    refused = {name: logged(p, OUTAGE) for name, p in processes.items()}
    refused["control"] = [e for e in driver_log if e["event"] == OUTAGE]
    print({name: len(lines) for name, lines in refused.items()})
    assert all(len(lines) <= 1 for lines in refused.values())  # once per outage, never per attempt
    assert all("maxmemory" in e["error"] for lines in refused.values() for e in lines)
    assert all(len(refused[m]) == 1 for m in models)  # their heartbeats met it, at least
    for name, p in processes.items():  # and each that met it said when it was over
        assert len(logged(p, "redis available again") + logged(p, "reconnected")) == len(refused[name])


@pytest.mark.slow
def test_a_model_worker_rides_out_a_long_script_and_a_restart_that_loads_for_seconds(tmp_path: Path) -> None:
    envs = ["e0", "e1", "e2"]
    server = RedisServer(tmp_path)
    # After a restart, each key of the AOF's base costs 0.1 ms more to load: seconds for the filler
    # (longer than redis-py's own retries), while Redis answers LOADING.
    server.args += ["--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024"]
    server.args += ["--enable-debug-command", "local"]
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.execute_command("DEBUG", "POPULATE", 25_000, "filler")
        client.bgrewriteaof()
        info = lambda: client.info("persistence")  # noqa: E731
        until(lambda: not info()["aof_rewrite_in_progress"] + info()["aof_rewrite_scheduled"], "the AOF")
        debug = worker_command(server.url, "m1", "--log-level", "debug")  # every attempt logged
        with running({"m1": debug}, tmp_path) as (ps, check):
            m1 = ps["m1"]
            answered = lambda: not unanswered(client, ["m1"])  # noqa: E731
            until(lambda: logged(m1, "ready"), "ready", check)
            publish(client, envs, reward=False)
            until(answered, "replies", check)
            client.config_set("busy-reply-threshold", 100)  # ms: then other clients are told BUSY
            publish(client, envs)  # the worker reads it, and its commit meets the script
            client.eval(SPIN, 0, 1500)
            until(answered, "replies after BUSY", check)
            assert [e["error"][:5] for e in logged(m1, OUTAGE, "warning")] == ["BUSY "]
            server.stop("shutdown")
            server.start()  # returns once it has loaded
            publish(client, envs)
            until(answered, "replies after LOADING", check)
        assert not unanswered(client, ["m1"], once=True) and client.xlen(STREAMS.observation) == 9
    finally:
        server.close()
    assert len(logged(m1, OUTAGE, "warning")) == 2  # once per outage
    assert any("loading the dataset" in e["error"] for e in logged(m1, OUTAGE))  # each attempt: debug
    assert logged(m1, "reconnected")


@pytest.mark.slow
def test_a_model_worker_writes_back_what_redis_lost_and_follows_an_older_snapshot(tmp_path: Path) -> None:
    envs = ["e0", "e1", "e2"]
    checkpoint, memory = STREAMS.model_key("m1", "checkpoint"), STREAMS.model_key("m1", "memory")
    with embedded_redis() as url, running({"m1": worker_command(url, "m1")}, tmp_path) as (ps, check):
        client, m1 = redis.Redis.from_url(url), ps["m1"]
        version = lambda: int(client.hget(checkpoint, "version"))  # noqa: E731

        def rounds(n: int, first: bool = False) -> None:
            for r in range(n):
                publish(client, envs, reward=not (first and r == 0))
                until(lambda: not unanswered(client, ["m1"]), "replies", check)

        until(lambda: logged(m1, "ready"), "ready", check)
        rounds(8, first=True)  # 7 transitions per environment: a segment each (n_steps 5), an update
        assert ModelStore(client, STREAMS, "m1").load().counters.updates >= 1
        state, held = {key: client.hgetall(key) for key in (checkpoint, memory)}, version()
        client.flushall()  # as a restart of a Redis without persistence
        until(lambda: logged(m1, "reloaded"), "the write-back", check)
        [gone] = logged(m1, "the checkpoint is gone (Redis came back empty?): writing back the last commit")
        assert [gone[k] for k in ("level", "envs", "stored_version")] == ["warning", 3, 0]
        assert gone["held_version"] == held
        assert {key: client.hgetall(key) for key in state} == state  # the last commit, every memory
        rounds(3)  # answered, growing from there
        assert version() == held + 3 and not unanswered(client, ["m1"], once=True)

        snapshot = {key: client.dump(key) for key in state}
        old, old_policy = version(), client.hget(checkpoint, "policy")
        rounds(3)
        newest = version()
        with client.pipeline(transaction=True) as pipe:  # Redis back from the older snapshot
            for key, blob in snapshot.items():
                pipe.restore(key, 0, blob, replace=True)
            pipe.execute()
        rounds(2)  # its next commit finds the older checkpoint: refused, it reloads and goes on
        [older] = logged(m1, "the checkpoint is older than this worker's last commit")
        assert (older["level"], older["stored_version"], older["held_version"]) == ("error", old, newest)
        reloaded = logged(m1, "reloaded")[-1]
        assert (reloaded["checkpoint_version"], reloaded["policy_sha"]) == (old, digest(old_policy))
        assert version() == old + 2 and not unanswered(client, ["m1"], once=True)
        assert client.xlen(STREAMS.observation) == 3 * (3 + 3 + 2)

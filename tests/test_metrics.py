"""Prometheus metrics (``--metrics-port``): a model, the aggregator and a runner serving a real loop
on a real redis-server, each scraped over HTTP twice; nothing served (nor read from Redis for
metrics) without the flag; the compose profile ``metrics`` scraping every component."""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import components
from tests.faults.test_security import PASSWORD, acl_setuser, port_of
from tests.helpers import xadd
from tests.test_compose import COMPOSE_FILE, ROOT, SERVICES, command_words, compose_binary, environment
from worker.aggregator import AggregatorSettings
from worker.common import metrics
from worker.common.metrics import ModelMetrics
from worker.common.serve import Service
from worker.common.servers import embedded_redis, free_port
from worker.env.runner import EnvRunner
from worker.env.settings import EnvSettings
from worker.model.settings import ModelSettings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

LONG_RUNNING = ("model", "aggregator", "env")  # the commands that serve metrics
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"


def scrape(port: int) -> Samples:
    """Every sample of ``GET /metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``; fails if there is none."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert found, f"{name}{labels} is missing"
    return sum(found)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextmanager
def serving(*services: Service) -> Iterator[None]:
    """``serve()`` each of ``services`` in a thread of its own (no signal handlers there), then stop
    them and check they stopped cleanly."""
    errors: list[BaseException] = []

    def run(service: Service) -> None:
        try:
            service.serve()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(service,), daemon=True) for service in services]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for service, thread in reversed(list(zip(services, threads, strict=True))):  # the runner first
            service.stop()
            thread.join(30)
            assert not thread.is_alive(), f"{type(service).__name__} did not stop"
    assert not errors, errors


def test_each_component_serves_its_metrics_while_the_loop_runs(real_redis, settings, env_settings) -> None:
    url = settings.redis_url
    ports = {"model": free_port(), "aggregator": free_port(), "runner": free_port()}
    model = components.model(settings, "m1", metrics_port=ports["model"])
    aggregator = components.aggregator(url, metrics_port=ports["aggregator"])
    changes = {"metrics_port": ports["runner"], "n_envs": 4, "runner_id": "r1", "action_timeout": 30.0}
    runner = EnvRunner(env_settings.model_copy(update=changes), redis.Redis.from_url(url))
    ids = {"model": "m1", "aggregator": "aggregator", "runner": "r1"}

    with serving(model, aggregator, runner):
        wait_for(lambda: real_redis.zscore("rl:models", "m1") is not None, "the model's heartbeat")
        wait_for(lambda: real_redis.hget("rl:runner:r1", "ready") is not None, "the runner")
        xadd(real_redis, "rl:control", {"CMD": "RUN", "RUN_ID": "long", "STEPS": 1_000_000})
        xadd(real_redis, "rl:observation", {"OBSERVATION": [1, 2], "ENV_ID": "broken"})  # a dead letter
        runner_steps = lambda: value(scrape(ports["runner"]), "rl_runner_steps_total")  # noqa: E731
        wait_for(lambda: runner_steps() >= 40, "the first steps")
        first = {kind: scrape(port) for kind, port in ports.items()}
        moved = {
            "model": "rl_model_observations_total",
            "aggregator": "rl_aggregator_decisions_total",
            "runner": "rl_runner_steps_total",
        }

        def all_moved() -> bool:
            return all(value(scrape(ports[k]), name) > value(first[k], name) for k, name in moved.items())

        wait_for(all_moved, "every component's counter to move")
        wait_for(lambda: value(scrape(ports["runner"]), "rl_runner_episodes_total") >= 1, "an episode")
        time.sleep(1.2)  # a model heartbeat reads its group once a second
        second = {kind: scrape(port) for kind, port in ports.items()}

    for kind, samples in second.items():  # every metric is labelled with its component's ID
        assert samples, kind
        for name, labels in samples:
            assert ("component_id", ids[kind]) in labels, (kind, name, labels)

    m = second["model"]
    assert value(m, "rl_model_observations_total") > value(first["model"], "rl_model_observations_total")
    assert value(m, "rl_model_batch_size_count") >= 1 and value(m, "rl_model_batch_size_sum") >= 1
    latencies = value(m, "rl_model_reply_latency_seconds_count")
    assert latencies == value(m, "rl_model_observations_total")  # one per observation answered
    assert 0 <= value(m, "rl_model_reply_latency_seconds_sum") / latencies < 5.0
    assert value(m, "rl_model_reply_latency_seconds_bucket", le="+Inf") == latencies
    assert value(m, "rl_model_updates_total") >= 1  # CartPole's segments of 5 steps complete quickly
    assert value(m, "rl_model_updates_skipped_total") == 0
    assert value(m, "rl_model_dead_letters_total", reason="invalid") == 1
    assert value(m, "rl_model_dead_letters_total", reason="redelivered") == 0
    assert value(m, "rl_model_envs_in_memory") == 4
    assert value(m, "rl_model_reconnects_total") == 0 and value(m, "rl_model_lease_losses_total") == 0
    assert value(m, "rl_model_group_lag", stream="rl:observation") >= 0
    assert value(m, "rl_model_group_pending", stream="rl:observation") >= 0
    assert value(m, "rl_model_group_lag", stream="rl:evolution") == 0

    a = second["aggregator"]
    decisions = value(a, "rl_aggregator_decisions_total")
    assert decisions > value(first["aggregator"], "rl_aggregator_decisions_total")
    assert value(a, "rl_aggregator_models_combined_count") == decisions
    assert value(a, "rl_aggregator_models_combined_sum") == decisions  # one model: one reply each
    assert value(a, "rl_aggregator_deadline_misses_total") >= 0
    assert value(a, "rl_aggregator_reconnects_total") == 0

    r = second["runner"]
    training = {"deterministic": "false"}
    assert value(r, "rl_runner_steps_total", **training) > value(first["runner"], "rl_runner_steps_total")
    episodes = value(r, "rl_runner_episodes_total", **training)
    assert episodes >= 1 and value(r, "rl_runner_episode_return_count", **training) == episodes
    assert value(r, "rl_runner_episode_return_sum", **training) >= episodes  # CartPole: 1 a step
    assert value(r, "rl_runner_steps_total", deterministic="true") == 0  # no evaluation run

    for port in ports.values():  # the endpoints close with their components
        with pytest.raises(urllib.error.URLError):
            scrape(port)


def test_metrics_port_is_off_by_default(real_redis, settings, monkeypatch) -> None:
    """No flag, no endpoint; the flag and its variable turn it on; a model without it sends Redis no
    command for its metrics (its ACL user needs none)."""
    for settings_class in (ModelSettings, AggregatorSettings, EnvSettings):
        assert settings_class(_cli_parse_args=False).metrics_port is None
        assert settings_class(_cli_parse_args=False).metrics_host == "127.0.0.1"
        assert settings_class(_cli_parse_args=["--metrics-port", "9100"]).metrics_port == 9100
        with monkeypatch.context() as patched:
            patched.setenv("METRICS_PORT", "9101")
            patched.setenv("METRICS_HOST", "0.0.0.0")
            parsed = settings_class(_cli_parse_args=False)
            assert (parsed.metrics_port, parsed.metrics_host) == (9101, "0.0.0.0")

    started: list[Any] = []
    monkeypatch.setattr(metrics, "start_http_server", lambda *args, **kwargs: started.append(args))
    real_redis.config_resetstat()
    model = components.model(settings, "m1")
    aggregator = components.aggregator(settings.redis_url)
    with serving(model, aggregator):
        wait_for(lambda: real_redis.zscore("rl:models", "m1") is not None, "the model's heartbeat")
        for k in range(20):
            xadd(real_redis, "rl:observation", {"OBSERVATION": [0.0, 0.1, 0.0, 0.1], "ENV_ID": f"e{k % 2}"})
        answered = lambda: model.metrics.registry.get_sample_value(  # noqa: E731
            "rl_model_observations_total", {"component_id": "m1"}
        )
        wait_for(lambda: answered() == 20, "the model's answers")
        time.sleep(1.2)  # heartbeats that would read the group if metrics were served
    assert started == [] and not model.metrics.served and not aggregator.metrics.served
    commands = real_redis.info("commandstats")
    assert not [name for name in commands if "xinfo" in name], commands.keys()


def test_a_model_user_without_xinfo_is_served_without_the_group_gauges() -> None:
    """Under the least-privilege user of docs/security.md (no XINFO), a served model's heartbeat
    goes on without its group's lag and pending; an admin's client reads them."""
    with embedded_redis() as url:  # a server of this test alone: its users change
        admin = redis.Redis.from_url(url)
        admin.execute_command(*acl_setuser())
        admin.xgroup_create("rl:observation", "model:m1", id="$", mkstream=True)
        user = redis.Redis.from_url(f"redis://rl-model:{PASSWORD}@127.0.0.1:{port_of(url)}/0")
        for client, readable in ((admin, True), (user, False)):
            model = ModelMetrics("m1", SimpleNamespace(reconnects=0))  # type: ignore[arg-type]
            model.served = True
            model.heartbeat(client, "model:m1", ["rl:observation"], envs=3)
            labels = {"component_id": "m1", "stream": "rl:observation"}
            assert (model.registry.get_sample_value("rl_model_group_lag", labels) == 0) is readable
            assert model.registry.get_sample_value("rl_model_envs_in_memory", {"component_id": "m1"}) == 3
        user.close()
        admin.close()


# ------------------------------------------------------------------------------------- compose


def test_compose_profile_metrics_scrapes_every_long_running_component() -> None:
    prometheus = SERVICES["prometheus"]
    assert prometheus["profiles"] == ["metrics"] and prometheus["image"].startswith("prom/prometheus:")
    mounts = [volume.split(":") for volume in prometheus["volumes"]]
    assert ["./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    serving_metrics = {
        name: environment(service)
        for name, service in SERVICES.items()
        if "build" in service and command_words(service)[0] in LONG_RUNNING
    }
    assert set(serving_metrics) == {"worker", "worker-2", "aggregator", "env"}
    assert targets == {f"{name}:{env['METRICS_PORT']}" for name, env in serving_metrics.items()}
    for name, env in serving_metrics.items():  # reachable from the Prometheus container
        assert env["METRICS_HOST"] == "0.0.0.0", name


@pytest.mark.parametrize("profiles", [["metrics"], ["swarm", "metrics"]])
def test_compose_config_with_profile_metrics_is_valid(profiles: list[str]) -> None:
    binary = compose_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("no compose binary: CI must validate the compose file with it")
        pytest.skip("no docker-compose / docker compose binary (apt-get install docker-compose)")
    flags = [word for profile in profiles for word in ("--profile", profile)]
    args = [*binary, "-f", str(COMPOSE_FILE), *flags, "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(args)} failed:\n{result.stdout}{result.stderr}"

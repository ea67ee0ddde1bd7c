"""Fixtures: a private real redis-server and a Redis Cluster per test session, fakeredis, and worker
settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from worker.common.servers import LocalCluster, embedded_cluster, embedded_redis
from worker.model.settings import ModelSettings

pytest_plugins = ["tests.scripted"]  # the environment runner's fixtures: env_settings, scripted


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a private redis-server on a free loopback port, started once per test session.

    In CI a missing redis-server fails the run instead of skipping the real-Redis tests.
    """
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: the real-Redis tests must not be skipped in CI")
        pytest.skip("redis-server is not installed")
    with embedded_redis() as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A private Redis Cluster (3 primaries, 3 replicas, loopback ports below 55000), started once per
    test session. Tests use their own hash-tag prefixes; a failover test kills and restarts nodes, so
    each test waits for :meth:`~LocalCluster.wait_ok` first (the fixture does, between tests).
    """
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server/redis-cli are missing: the cluster tests must not be skipped in CI")
        pytest.skip("redis-server is not installed")
    with embedded_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> LocalCluster:
    """The session's cluster, every node running and every slot served (after a failover test too)."""
    for port in set(redis_cluster.ports) - set(redis_cluster.running()):
        redis_cluster.start_node(port)
    redis_cluster.wait_ok()
    return redis_cluster


@pytest.fixture
def real_redis(redis_server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def fake_redis() -> Iterator[redis.Redis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture(params=["real", "fake"])
def any_redis(request: pytest.FixtureRequest) -> redis.Redis:
    """Run a test against both a real redis-server and fakeredis."""
    return request.getfixturevalue("real_redis" if request.param == "real" else "fake_redis")


@pytest.fixture
def settings(redis_server_url: str) -> ModelSettings:
    return ModelSettings(
        _cli_parse_args=False,
        redis_url=redis_server_url,
        component_id="m1",
        seed=0,
        block_ms=50,
        lease_ttl=1.0,
    )

"""Fixtures: a private real redis-server per test session, fakeredis, and worker settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from worker.common.servers import embedded_redis
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

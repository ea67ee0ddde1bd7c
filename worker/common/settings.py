"""Typed settings every component shares: every option is a command-line flag and an environment
variable.

``python -m worker model --help`` prints them; the environment variable of ``--foo-bar`` is
``FOO_BAR`` unless ``validation_alias`` names another one.
"""

from __future__ import annotations

from typing import Any, Literal

import redis
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from worker.common.connections import connect, swarm_prefix


class SpacesError(ValueError):
    """The environment or the spaces a command was given cannot be used: mended with a flag."""


def env_alias(name: str, *more: str) -> AliasChoices:
    """Accept the field's own name (CLI) and the documented environment variable(s)."""
    return AliasChoices(name, *more)


class CommonSettings(BaseSettings):
    """Settings every component shares: where Redis is, which deployment, how to log."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_implicit_flags=True,
        case_sensitive=False,
        extra="ignore",
    )

    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis URL (redis://, rediss:// for TLS, unix://); env REDIS_URL",
    )
    prefix: str = Field(
        "rl",
        validation_alias=env_alias("prefix", "stream_prefix"),
        description="prefix of all streams and keys (default 'rl'; '{rl}' with --cluster, a hash tag: one"
        " slot); env STREAM_PREFIX",
    )
    cluster: bool = Field(
        False,
        validation_alias=env_alias("cluster", "redis_cluster"),
        description="REDIS_URL names a node of a Redis Cluster (the prefix must then be a hash tag,"
        " '{rl}'); env REDIS_CLUSTER",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool = Field(False, description="log JSON lines instead of human-readable text")

    @field_validator("redis_url", check_fields=False)
    @classmethod
    def _redis_can_use(cls, url: str | None) -> str | None:
        if url is not None:
            parse_url(url)  # a ValueError for a scheme, port or option redis-py cannot use
        return url

    @model_validator(mode="after")
    def _prefix_fits_cluster(self) -> CommonSettings:
        given = self.prefix if "prefix" in self.model_fields_set else None
        self.prefix = swarm_prefix(given, self.cluster)
        return self

    def connect(self, **kwargs: Any) -> redis.Redis:
        """A client for this deployment's Redis (one server or a cluster)."""
        return connect(self.redis_url, cluster=self.cluster, **kwargs)


class ServiceSettings(CommonSettings):
    """Settings of a long-running component (model, aggregator, runner): where it serves its metrics."""

    metrics_port: int | None = Field(
        None,
        gt=0,
        le=65535,
        description="serve Prometheus metrics on this port (http://HOST:PORT/metrics); off by default",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the metrics port binds: loopback by default; 0.0.0.0 to be scraped from"
        " other hosts or containers",
    )

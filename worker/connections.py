"""Redis connections: clients from a URL, consumer groups, and an embedded server for demos and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; AUTH in the URL).

    Single commands retry with exponential backoff on connection errors, so a short Redis restart
    is ridden out; the worker loop handles longer outages itself.
    """
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5))
    kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    kwargs.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **kwargs)


def ensure_group(client: redis.Redis, stream: str, group: str) -> bool:
    """Create ``group`` on ``stream`` at its end (``$``), making the stream if needed; True if new."""
    try:
        client.xgroup_create(stream, group, id="$", mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_redis(appendonly: bool = False, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Start a private ``redis-server`` on a free loopback port; yield its URL; stop it after.

    :param appendonly: keep an AOF (for restart tests); otherwise nothing touches the disk
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="rl-redis-")
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        workdir,
        "--appendonly",
        "yes" if appendonly else "no",
        *extra,
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {' '.join(args)}") from None
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)

"""Redis connections: clients from a URL, consumer groups, and an embedded server for demos and tests."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry


class RedisAccessError(SystemExit):
    """Redis refuses this client for good (credentials, TLS certificate): retrying cannot help.

    A ``SystemExit``, so a command started from the CLI stops with this one line on stderr and exit
    status 1 instead of a traceback or an endless retry loop.
    """


def text(value: bytes | str) -> str:
    """A Redis reply's name or ID as ``str`` (clients without ``decode_responses`` give ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else value


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; AUTH in the URL).

    TLS options are query parameters of the URL, passed to redis-py's ``SSLConnection``:
    ``rediss://host:6380/0?ssl_ca_certs=/path/ca.crt`` (a private CA), plus ``ssl_certfile`` and
    ``ssl_keyfile`` for a client certificate (``tls-auth-clients yes``). See docs/security.md.

    Single commands retry with exponential backoff on connection errors, so a short Redis restart
    is ridden out; the worker loop handles longer outages itself. Wrong credentials or a server
    certificate that does not verify raise :class:`RedisAccessError` here, at once: they are not
    outages. An unreachable server is not an error yet (the caller's retries deal with it).
    """
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5))
    kwargs.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    kwargs.setdefault("health_check_interval", 30)
    # A frozen server or a half-open connection must not block a "timed" wait forever; every
    # blocking read here blocks for at most 30 s (the block_ms settings' bound).
    kwargs.setdefault("socket_timeout", 60)
    check_access(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def check_access(url: str, **kwargs) -> None:
    """One PING without retries: raise :class:`RedisAccessError` if Redis refuses us for good."""
    kwargs = {**kwargs, "retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 5}
    probe = redis.Redis.from_url(url, **kwargs)
    try:
        probe.ping()
    except redis.AuthenticationError as exc:  # WRONGPASS, NOAUTH (no or wrong credentials in the URL)
        raise RedisAccessError(f"error: Redis at {redacted(url)} refused the credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc.__context__, ssl.SSLCertVerificationError):
            raise RedisAccessError(
                f"error: the TLS certificate of Redis at {redacted(url)} does not verify: {exc.__context__}"
                " (give the CA with ?ssl_ca_certs=/path/ca.crt)"
            ) from None
        # not reachable (yet): the caller's retries and loop handle outages
    except redis.ResponseError:
        pass  # e.g. NOPERM for PING: the user may run without it; its own commands will tell
    finally:
        probe.close()


def ensure_group(client: redis.Redis, stream: str, group: str, start: str = "$") -> bool:
    """Create ``group`` on ``stream``, making the stream if needed; True if it was new.

    :param start: the group reads the entries after this ID; ``$``, the stream's end, for a group
        never made before (a component that made it before passes the last entry it read, so a
        group that vanished, as in a Redis that came back empty, misses nothing published since)
    """
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False


def last_id(client: redis.Redis, stream: str) -> str:
    """What ``$`` means now, as a concrete ID: reading after it later misses nothing in between."""
    try:
        value = client.xinfo_stream(stream)["last-generated-id"]
    except redis.ResponseError as exc:
        if "no such key" not in str(exc):
            raise  # BUSY, TRYAGAIN, ...: an outage, not a stream that does not exist
        return "0-0"  # no such stream yet: everything added later is new
    return text(value)


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

"""Prometheus metrics of the long-running components, and the endpoint that serves them.

A component (model, aggregator, runner) keeps its metrics in a :class:`ServiceMetrics` of its kind:
one method per event it reports (a commit, a decision, a step), the bookkeeping here. Each has its
own :class:`~prometheus_client.CollectorRegistry`, so several components in one process (the tests)
keep theirs apart, and every metric carries the label ``component_id``: a model's COMPONENT_ID, the
aggregator's consumer name, a runner's RUNNER_ID. Names are ``rl_<kind>_<what>``, in base units
(seconds), counters ending in ``_total``. They count what this process did since it started;
Prometheus's ``rate()`` takes a restart as a counter reset.

Metrics are always kept (a few increments per batch, and a model's latency of each observation);
they are served only with ``--metrics-port`` (:meth:`ServiceMetrics.expose`, called by the serve
loop): ``GET /metrics`` on ``--metrics-host``, loopback by default (``0.0.0.0`` in containers, where
the compose network decides who reaches it). Only a served model reads Redis for them (once a
second at most, on its heartbeat), so a model without a metrics port runs exactly the commands its
ACL user allows.

**The reply latency** of a model runs from an observation's entry ID (Redis's clock, in ms, when
it was published) to the commit of its reply, taken on this host's clock corrected by its offset to
the clock of the server holding the observation stream (measured on the heartbeat with one ``TIME``
in a script): no round trip per batch, and a host clock that is off does not shift the latency.
Until that reading (never if metrics are not served, or Redis refuses the readings) it is the host's
clock alone.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.common import logs
from worker.common.connections import text
from worker.common.serve import REDIS_ERRORS, is_outage
from worker.protocol import split_id

if TYPE_CHECKING:
    from worker.common.serve import Outages

log = logs.get(__name__)

PREFIX = "rl"
SIZES = tuple(float(2**k) for k in range(13))  # entries per batch: 1 .. 4096 (the largest --batch-size)
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ENSEMBLE = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)  # models combined in a decision
REFRESH = 1.0  # seconds: the least time between two readings of a model's consumer group
DEAD_REASONS = ("invalid", "redelivered", "internal")
CLOCK = "return redis.call('TIME')"  # by EVALSHA, as the model's own scripts


def dead_reason(reason: str) -> str:
    """The kind of a model's dead letter, from its reason: ``redelivered`` (delivered too often without
    a commit: it may crash the worker), ``internal`` (handling it raised), else ``invalid`` (the entry
    breaks the protocol: unreadable, too large, not fitting the spaces)."""
    if reason.startswith("delivered "):
        return "redelivered"
    if reason.startswith("internal error"):
        return "internal"
    return "invalid"


@dataclass
class Exporter:
    """The HTTP endpoint of one registry (``GET /metrics``), served by a thread of its own."""

    server: Any
    thread: threading.Thread
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Read(Collector):
    """A counter read from the component when scraped (a total it keeps anyway)."""

    def __init__(self, name: str, documentation: str, component_id: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.component_id, self.read = name, documentation, component_id, read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["component_id"])
        family.add_metric([self.component_id], self.read())
        yield family


class ServiceMetrics:
    """What every component reports: its reconnections to Redis. A kind adds its own metrics.

    :param component_id: the value of every metric's ``component_id`` label
    :param outages: the component's view of Redis (its reconnections are read from it when scraped)
    """

    kind = "service"

    def __init__(self, component_id: str, outages: Outages) -> None:
        self.component_id = component_id
        self.registry = CollectorRegistry()
        self.served = False  # set by expose(): only then does a model read Redis for its metrics
        about = "reconnections to Redis noticed (after an outage, or a command redis-py resent)"
        read = lambda: outages.reconnects  # noqa: E731
        self.registry.register(_Read(self.name("reconnects"), about, component_id, read))

    def name(self, what: str) -> str:
        return f"{PREFIX}_{self.kind}_{what}"

    def counter(self, what: str, documentation: str, *labels: str) -> Counter:
        """A counter of this component (labelled already unless ``labels`` are added)."""
        metric = Counter(self.name(what), documentation, ["component_id", *labels], registry=self.registry)
        return metric if labels else metric.labels(self.component_id)

    def gauge(self, what: str, documentation: str, *labels: str) -> Gauge:
        metric = Gauge(self.name(what), documentation, ["component_id", *labels], registry=self.registry)
        return metric if labels else metric.labels(self.component_id)

    def histogram(self, what: str, documentation: str, buckets: Iterable[float], *labels: str) -> Histogram:
        names = ["component_id", *labels]
        metric = Histogram(self.name(what), documentation, names, registry=self.registry, buckets=buckets)
        return metric if labels else metric.labels(self.component_id)

    def expose(self, settings: Any) -> Exporter | None:
        """Serve the metrics on ``settings.metrics_port`` (at ``settings.metrics_host``); None if off.

        :raises SystemExit: the port cannot be bound (one line, as any error the user mends)
        """
        port = getattr(settings, "metrics_port", None)
        if port is None:
            return None
        host = getattr(settings, "metrics_host", "127.0.0.1")
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise SystemExit(f"error: --metrics-port {port} on {host}: {exc}") from None
        self.served = True
        url = f"http://{host}:{port}/metrics"
        log.info("metrics served", url=url, component_id=self.component_id)
        return Exporter(server, thread, url)


class ModelMetrics(ServiceMetrics):
    """A model worker's metrics: see :meth:`committed`, :meth:`loaded`, :meth:`heartbeat`."""

    kind = "model"

    def __init__(self, component_id: str, outages: Outages) -> None:
        super().__init__(component_id, outages)
        self.observations = self.counter("observations_total", "observations answered (replies committed)")
        self.batch_size = self.histogram("batch_size", "entries per committed batch", SIZES)
        self.latency = self.histogram(
            "reply_latency_seconds", "from an observation's entry ID to the commit of its reply", LATENCY
        )
        self.updates = self.counter("updates_total", "A2C updates applied")
        self.skipped = self.counter("updates_skipped_total", "A2C updates skipped: gradient not finite")
        self.dead = self.counter("dead_letters_total", "entries dead-lettered, by kind of reason", "reason")
        for reason in DEAD_REASONS:
            self.dead.labels(component_id, reason)  # each kind is there from the start, at 0
        self.envs = self.gauge("envs_in_memory", "environments whose memory the model holds")
        self.lease_losses = self.counter("lease_losses_total", "lease lost: the model reloaded from Redis")
        self.lag = self.gauge("group_lag", "entries of the stream its group has yet to read", "stream")
        self.pending = self.gauge("group_pending", "entries read by its group, not yet committed", "stream")
        self._learned: tuple[int, int] | None = None  # (updates, skipped) last loaded or committed
        self._offset = 0.0  # seconds: Redis's clock minus this host's
        self._read_at = -math.inf  # monotonic time of the last reading of the group
        self._readable = True  # False once Redis refused a reading (an ACL user without XINFO)
        self._clock: Any = None  # CLOCK, registered with the model's client

    def loaded(self, counters: Any) -> None:
        """The model's state was loaded (its :class:`~worker.model.learner.Counters`): the next commit's
        updates are counted from there."""
        self._learned = (counters.updates, counters.skipped)

    def committed(
        self, acks: Mapping[str, Collection[str]], answered: list[str], rejected: list[str], counters: Any
    ) -> None:
        """A batch was committed.

        :param acks: the entries it acknowledged, by stream
        :param answered: the entry IDs of the observations it answered
        :param rejected: the reasons of the entries it dead-lettered
        :param counters: the model's counters it committed
        """
        entries = sum(len(ids) for ids in acks.values())
        if entries:
            self.batch_size.observe(entries)
        self.observations.inc(len(answered))
        now_ms = (time.time() + self._offset) * 1000
        for entry_id in answered:
            self.latency.observe(max(0.0, now_ms - split_id(entry_id)[0]) / 1000)
        for reason in rejected:
            self.dead.labels(self.component_id, dead_reason(reason)).inc()
        if self._learned is not None:
            self.updates.inc(max(0, counters.updates - self._learned[0]))
            self.skipped.inc(max(0, counters.skipped - self._learned[1]))
        self._learned = (counters.updates, counters.skipped)

    def heartbeat(self, client: redis.Redis, group: str, streams: Iterable[str], envs: int) -> None:
        """On the model's heartbeat: its environments; when served, once a second at most, its group's
        lag and pending entries on each input stream (``XINFO GROUPS``) and the offset of the host's
        clock to Redis's (``streams``' first, the observations').

        An outage is raised, as for the heartbeat's own commands; a refusal (ACL) stops the readings
        with one warning; any other error (a stream deleted meanwhile) waits for the next reading.
        """
        self.envs.set(envs)
        now = time.monotonic()
        if not (self.served and self._readable) or now - self._read_at < REFRESH:
            return
        self._read_at = now
        streams = list(streams)
        try:
            self._clock = self._clock or client.register_script(CLOCK)
            before = time.time()
            seconds, micros = self._clock(keys=[streams[0]])
            self._offset = int(seconds) + int(micros) / 1e6 - (before + time.time()) / 2
            for stream in streams:
                for info in client.xinfo_groups(stream):
                    if text(info["name"]) == group:
                        lag = info.get("lag")  # None: Redis cannot tell (entries deleted mid-stream)
                        self.lag.labels(self.component_id, stream).set(math.nan if lag is None else lag)
                        self.pending.labels(self.component_id, stream).set(info["pending"])
        except REDIS_ERRORS as exc:
            if is_outage(exc):
                raise
            if isinstance(exc, redis.exceptions.NoPermissionError):
                self._readable = False
                log.warning(
                    "metrics: cannot read the consumer group (the ACL user needs +xinfo|groups)",
                    error=str(exc),
                    component_id=self.component_id,
                )
            else:
                log.debug("metrics: consumer group not read", error=str(exc), component_id=self.component_id)


class AggregatorMetrics(ServiceMetrics):
    """The aggregator's metrics: see :meth:`decided`."""

    kind = "aggregator"

    def __init__(self, component_id: str, outages: Outages) -> None:
        super().__init__(component_id, outages)
        self.decisions = self.counter("decisions_total", "observations decided (actions published)")
        self.combined = self.histogram(
            "models_combined", "models whose replies one decision combined", ENSEMBLE
        )
        self.misses = self.counter(
            "deadline_misses_total", "decisions taken at the deadline, without every live model's reply"
        )

    def decided(self, answered: list[Collection[str]], live: Collection[str]) -> None:
        """Observations were decided (their actions published).

        :param answered: per observation, the models whose replies were combined
        :param live: the models live when they were decided
        """
        self.decisions.inc(len(answered))
        for models in answered:
            self.combined.observe(len(models))
            if any(model not in models for model in live):
                self.misses.inc()


class RunnerMetrics(ServiceMetrics):
    """An environment runner's metrics (label ``deterministic``: evaluation runs); see :meth:`stepped`."""

    kind = "runner"

    def __init__(self, component_id: str, outages: Outages) -> None:
        super().__init__(component_id, outages)
        steps = self.counter("steps_total", "environment steps taken", "deterministic")
        episodes = self.counter("episodes_total", "episodes ended (terminated or truncated)", "deterministic")
        returns = Summary(
            self.name("episode_return"),
            "returns of the episodes ended (their mean: rate of _sum over rate of _count)",
            ["component_id", "deterministic"],
            registry=self.registry,
        )
        flags = {False: "false", True: "true"}
        self._steps = {k: steps.labels(component_id, v) for k, v in flags.items()}
        self._episodes = {k: episodes.labels(component_id, v) for k, v in flags.items()}
        self._returns = {k: returns.labels(component_id, v) for k, v in flags.items()}

    def stepped(self, deterministic: bool, ended: tuple[float, int] | None) -> None:
        """An environment took a step; ``ended``: the ``(return, length)`` of the episode it ended."""
        self._steps[deterministic].inc()
        if ended is not None:
            self._episodes[deterministic].inc()
            self._returns[deterministic].observe(ended[0])

"""Real components (model workers, the aggregator) stepping in background threads, for tests that
drive them from outside as an environment would."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from worker.aggregator import Aggregator, AggregatorSettings
from worker.model.loop import ModelWorker
from worker.model.settings import ModelSettings


def model(settings: ModelSettings, component_id: str = "m1", **changes: Any) -> ModelWorker:
    """A model worker with its own connection."""
    changed = settings.model_copy(update={"component_id": component_id, **changes})
    return ModelWorker(changed, redis.Redis.from_url(settings.redis_url))


def aggregator(url: str, **changes: Any) -> Aggregator:
    settings = AggregatorSettings(_cli_parse_args=False, redis_url=url, seed=0, block_ms=20, **changes)
    return Aggregator(settings, redis.Redis.from_url(url))


class Running:
    """Components started, then stepped in one thread each until :meth:`halt`."""

    def __init__(self) -> None:
        self._halt = threading.Event()
        self.threads: list[tuple[threading.Thread, threading.Event]] = []
        self.errors: list[BaseException] = []

    def add(self, component: ModelWorker | Aggregator) -> None:
        component.start()
        halt = threading.Event()

        def loop() -> None:
            try:
                while not (halt.is_set() or self._halt.is_set()):
                    component.step()
            except BaseException as exc:  # noqa: BLE001 - surfaced by halt()
                self.errors.append(exc)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.threads.append((thread, halt))

    def stop(self, index: int) -> None:
        """Stop one component (in the order added)."""
        thread, halt = self.threads[index]
        halt.set()
        thread.join(5)

    def halt(self) -> None:
        self._halt.set()
        for thread, _ in self.threads:
            thread.join(5)
        if self.errors:
            raise self.errors[0]


@contextmanager
def running(*components: ModelWorker | Aggregator) -> Iterator[Running]:
    """Step ``components`` in the background for the ``with`` block."""
    run = Running()
    try:
        for component in components:
            run.add(component)
        yield run
    finally:
        run.halt()

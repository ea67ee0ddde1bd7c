"""A batch that lingers: with --min-batch and --linger-ms, entries that come one by one (environments
stepping on their own) are answered in one batch, not one batch each; without, one read is a batch."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import read, xadd
from worker.model.loop import ModelWorker


def publish_later(client, messages: list[dict], gap: float) -> threading.Thread:
    def publish() -> None:
        for message in messages:
            time.sleep(gap)
            xadd(client, "rl:observation", message)

    thread = threading.Thread(target=publish)
    thread.start()
    return thread


@pytest.mark.parametrize(("min_batch", "linger_ms"), [(4, 500.0), (1, 0.0)])
def test_entries_coming_one_by_one_fill_a_lingering_batch(
    real_redis, settings, min_batch: int, linger_ms: float
) -> None:
    lingering = settings.model_copy(update={"min_batch": min_batch, "linger_ms": linger_ms})
    worker = ModelWorker(lingering, real_redis)
    worker.start()
    messages = [{"OBSERVATION": [0.01 * k, 0.0, 0.0, 0.0], "ENV_ID": f"e{k}"} for k in range(4)]
    xadd(real_redis, "rl:observation", messages[0])
    thread = publish_later(real_redis, messages[1:], gap=0.02)
    polled = []
    while sum(polled) < 4:
        if n := worker.poll():
            polled.append(n)
    thread.join()
    assert (len(polled) == 1) is (min_batch == 4), polled  # one batch, or one per read
    assert worker.counters.version == 1 + len(polled)  # one commit per batch
    assert len(read(real_redis, "rl:logits")) == 4


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [({"min_batch": 512, "batch_size": 256}, "cannot exceed --batch-size"),
     ({"linger_ms": 2000.0, "lease_ttl": 5.0}, "under a third of --lease-ttl")],
)  # fmt: skip
def test_a_linger_that_cannot_work_is_refused(settings, changes: dict, refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        type(settings)(**{**settings.model_dump(), **changes, "_cli_parse_args": False})

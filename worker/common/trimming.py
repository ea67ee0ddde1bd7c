"""How a writer keeps the streams it appends to bounded: the trimming arguments of its XADDs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class StreamTrim:
    """How a writer keeps the streams it appends to bounded: the trimming arguments of its XADDs.

    ``maxlen``: ``XADD ... MAXLEN ~ <maxlen>`` keeps about the newest ``maxlen`` entries.
    ``minid``: ``XADD ... MINID ~ <now - min_age_ms>`` drops entries older than ``min_age_ms``
    (by the writer's clock against the IDs' millisecond part, which is the Redis server's clock for
    ``*`` IDs: keep the clocks in sync). MINID bounds a stream's age, not its length: a burst of
    traffic is kept whole until it ages out.

    Both are approximate (``~``): Redis trims whole macro nodes, so a stream may briefly hold a
    little more (at most a few hundred entries) than the bound.
    """

    policy: Literal["maxlen", "minid"] = "maxlen"
    maxlen: int = 100_000
    min_age_ms: int = 3_600_000

    @classmethod
    def of(cls, value: int | StreamTrim) -> StreamTrim:
        """A bare integer is a MAXLEN (what writers passed before there was a choice)."""
        return value if isinstance(value, StreamTrim) else cls("maxlen", maxlen=int(value))

    def threshold(self, now: float | None = None) -> tuple[Literal["MAXLEN", "MINID"], int | str]:
        """``XADD``'s trimming strategy and threshold; ``now`` (unix seconds) defaults to the clock."""
        if self.policy == "maxlen":
            return "MAXLEN", self.maxlen
        now_ms = int((time.time() if now is None else now) * 1000)
        return "MINID", f"{max(0, now_ms - self.min_age_ms)}-0"

    def xadd_args(self, now: float | None = None) -> dict[str, Any]:
        """Keyword arguments of redis-py's ``xadd``."""
        strategy, threshold = self.threshold(now)
        return {strategy.lower(): threshold, "approximate": True}

"""``python -m bench.clients`` in a tiny configuration: every mode delivers actions, and the bytes a
client reads per action grow with the clients only when they share one reply stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def rows(output: str) -> dict[tuple[str, int], list[float]]:
    """(mode, clients) -> the numbers of its row of the table."""
    table = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            table[cells[0], int(cells[1])] = [float(c.replace(",", "")) for c in cells[2:]]
    return table


def test_bench_clients_tiny_run(redis_server_url: str) -> None:  # the fixture: skip without redis-server
    tiny = ["--clients", "1", "2", "--seconds", "1", "--warmup", "0.3"]
    command = [sys.executable, "-m", "bench.clients", *tiny]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    table = rows(done.stdout)
    assert set(table) == {(m, n) for m in ("ensemble", "direct", "local", "shared") for n in (1, 2)}
    for (mode, n), (p50, p99, rate, per_action, _cpu) in table.items():
        assert 0 < p50 <= p99 and rate > 0 and per_action > 0, (mode, n, done.stdout)
    assert "timed out" not in done.stdout
    # own reply streams: what one action costs does not depend on the others; shared: it does
    for mode in ("ensemble", "direct"):
        assert table[mode, 2][3] < 1.2 * table[mode, 1][3], done.stdout
    assert table["shared", 2][3] > 1.4 * table["shared", 1][3], done.stdout
    assert "verdict: bytes/action at 2 clients vs 1: ensemble" in done.stdout

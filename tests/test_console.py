"""A clean console: log lines and the progress bar never share a line; --log-json stays JSON."""

from __future__ import annotations

import json

from tqdm import tqdm

from worker.common import logs


def logged_under_a_bar(capsys, json_lines: bool) -> list[str]:
    """The log lines as a terminal shows them (the text after each physical line's last carriage
    return), logged while a progress bar is drawn."""
    logs.configure("info", json_lines)
    try:
        log = logs.get("test")
        for i in tqdm(range(3), desc="rounds"):
            log.info("round", i=i)
        physical = capsys.readouterr().err.split("\n")
    finally:
        logs.configure()
    shown = [line.split("\r")[-1] for line in physical]
    return [line for line in shown if "[info" in line or '"event"' in line]


def test_log_lines_never_share_a_line_with_the_bar(capsys) -> None:
    logged = logged_under_a_bar(capsys, json_lines=False)
    assert len(logged) == 3
    for line in logged:
        assert "%|" not in line and "rounds" not in line, line  # the bar was lifted first
        assert line.startswith("20") and "round" in line  # the line starts with its timestamp


def test_json_lines_stay_machine_readable_under_a_bar(capsys) -> None:
    parsed = [json.loads(line) for line in logged_under_a_bar(capsys, json_lines=True)]
    assert [p["i"] for p in parsed] == [0, 1, 2] and all(p["event"] == "round" for p in parsed)

"""Structured logging: key=value lines for people, JSON lines (``--log-json``) for machines."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from tqdm import tqdm


class _LineLogger:
    """Writes each line to stderr through ``tqdm.write``: a progress bar on the console is lifted
    for the line and drawn again below it, so the two never share a line (without a bar it is a
    plain write). stderr is looked up at each line, not when configure() ran: a caller (pytest's
    capture, for one) may have swapped it since, and the old one may be closed."""

    def msg(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def _stderr_logger(*_: Any) -> _LineLogger:
    return _LineLogger()


def configure(level: str = "info", json: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)


if not structlog.is_configured():
    # Embedded use (tests, notebooks, bench): info and up, not structlog's default of everything.
    configure()

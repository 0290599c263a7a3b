"""structlog set-up: JSON lines when stderr is not a terminal (journald, files), else readable."""

from __future__ import annotations

import logging
import os
import sys

import msgspec
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _dumps(obj: object, **_: object) -> str:
    return msgspec.json.encode(obj).decode()


def configure(level: str = "info", fmt: str | None = None) -> None:
    """Set up structlog for the daemon. ``fmt``: "json", "console", or None to decide by tty.

    $ROUTERD_LOG_FORMAT overrides the choice.
    """
    fmt = os.environ.get("ROUTERD_LOG_FORMAT") or fmt
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )

"""structlog set-up: JSON lines when stderr is not a terminal (journald, files), else readable.

A reply's ``request`` line is written at the default level, so every request pays for one
line: it is rendered to bytes once and written as they are, and its time stamp reuses the
second it was formatted for (``bench/logline.py`` measures it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_encode = msgspec.json.Encoder().encode


def _dumps(obj: object, **_: object) -> bytes:
    return _encode(obj)


def _dumps_text(obj: object, **_: object) -> str:
    return _encode(obj).decode()


class UtcStamper:
    """Adds ``timestamp``: UTC, ISO 8601 to the microsecond (``2026-12-02T11:20:54.296498Z``).

    The date and time of day are formatted once a second; each line adds its microseconds.
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, __: str, event: structlog.types.EventDict) -> Any:
        micros = time.time_ns() // 1000  # whole numbers: no float rounds a stamp wrong
        second, fraction = divmod(micros, 1_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event["timestamp"] = f"{self._prefix}.{fraction:06d}Z"
        return event


def configure(level: str = "info", fmt: str | None = None) -> None:
    """Set up structlog for the daemon. ``fmt``: "json", "console", or None to decide by tty.

    $ROUTERD_LOG_FORMAT overrides the choice.
    """
    fmt = os.environ.get("ROUTERD_LOG_FORMAT") or fmt
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    factory: Callable[..., Any]
    raw = getattr(sys.stderr, "buffer", None)
    if fmt == "json" and raw is not None:
        # Rendered to bytes and written as they are: no str made and encoded again.
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory = structlog.BytesLoggerFactory(raw)
    else:
        if fmt == "json":  # a stand-in stderr that takes only text
            renderer = structlog.processors.JSONRenderer(serializer=_dumps_text)
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            UtcStamper(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )

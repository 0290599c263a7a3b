"""routerd's log set-up: JSON lines (bytes straight to stderr), their time stamps, levels."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from routerd import log


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    # configure() is process-wide; the next test gets structlog's defaults back.
    yield
    structlog.reset_defaults()


def _stderr(monkeypatch: pytest.MonkeyPatch) -> io.BytesIO:
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8"))
    return raw


def test_a_json_line_is_one_object_with_level_and_a_utc_stamp_to_the_microsecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = _stderr(monkeypatch)
    log.configure("info", "json")
    before = datetime.now(UTC)
    structlog.get_logger("routerd.test").info("request", route="r", ms=1.25, stream=False)
    after = datetime.now(UTC)
    lines = raw.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["event"] == "request"
    assert entry["level"] == "info"
    assert (entry["route"], entry["ms"], entry["stream"]) == ("r", 1.25, False)
    stamp = entry["timestamp"]
    assert stamp.endswith("Z") and len(stamp) == len("2026-12-02T11:20:54.296498Z")
    assert before.replace(microsecond=0) <= datetime.fromisoformat(stamp) <= after


def test_the_stamp_keeps_its_second_and_adds_each_lines_microseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = [1796210147_500000, 1796210147_000001, 1796210148_000000, 1796210148_999999]
    clock = iter(micros * 1000 + 999 for micros in at)  # nanoseconds, cut to microseconds
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    stamper = log.UtcStamper()
    stamps = [stamper(None, "info", {})["timestamp"] for _ in range(4)]
    assert stamps == [
        "2026-12-02T11:15:47.500000Z",
        "2026-12-02T11:15:47.000001Z",
        "2026-12-02T11:15:48.000000Z",  # a whole second still has its fraction
        "2026-12-02T11:15:48.999999Z",
    ]
    for stamp, micros in zip(stamps, at, strict=True):
        stamped = datetime.fromisoformat(stamp)
        assert int(stamped.timestamp()) * 1_000_000 + stamped.microsecond == micros


def test_the_level_filters_and_a_warning_still_goes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _stderr(monkeypatch)
    log.configure("warning", "json")
    logger = structlog.get_logger("routerd.test")
    logger.info("request", route="r")
    logger.warning("breaker_opened", target="p/m")
    entries = [json.loads(line) for line in raw.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in entries] == [("breaker_opened", "warning")]


def test_an_exception_is_rendered_into_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _stderr(monkeypatch)
    log.configure("info", "json")
    try:
        raise ValueError("the canary reason")
    except ValueError:
        structlog.get_logger("routerd.test").exception("settle_crashed")
    (entry,) = [json.loads(line) for line in raw.getvalue().splitlines()]
    assert entry["event"] == "settle_crashed" and entry["level"] == "error"
    assert "ValueError: the canary reason" in entry["exception"]


def test_a_text_only_stderr_gets_the_same_json(monkeypatch: pytest.MonkeyPatch) -> None:
    text = io.StringIO()  # no .buffer: the line is written as text
    monkeypatch.setattr(sys, "stderr", text)
    log.configure("info", "json")
    structlog.get_logger("routerd.test").info("listening", pid=7)
    (entry,) = [json.loads(line) for line in text.getvalue().splitlines()]
    assert (entry["event"], entry["pid"], entry["level"]) == ("listening", 7, "info")


def test_console_lines_are_readable_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _stderr(monkeypatch)
    monkeypatch.setenv("ROUTERD_LOG_FORMAT", "console")
    log.configure("info", "json")  # the variable wins
    structlog.get_logger("routerd.test").info("listening", pid=7)
    sys.stderr.flush()
    line = raw.getvalue().decode()
    assert "listening" in line and "pid=7" in line
    assert not line.startswith("{")


def test_lines_written_one_after_another_stay_whole_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = _stderr(monkeypatch)
    log.configure("info", "json")
    logger = structlog.get_logger("routerd.test")
    for n in range(50):
        logger.info("request", n=n)
    assert [json.loads(line)["n"] for line in raw.getvalue().splitlines()] == list(range(50))

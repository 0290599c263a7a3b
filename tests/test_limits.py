"""Rate-limit header parsing: the numbers a credential's cooldown is built from."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from routerd.core.limits import (
    anthropic_limits,
    go_duration_reset,
    limits_from_headers,
    openai_limits,
    parse_go_duration,
    retry_after,
    rfc3339_reset,
    window_reset,
)
from routerd.core.outcome import Window

NOW = datetime(2025, 8, 21, 12, 40, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1.234s", 1.234),
        ("2m59.56s", 179.56),
        ("1h2m3s", 3723.0),
        ("0s", 0.0),
        ("1s", 1.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("7.66ms", 0.00766),
        (" 6m0s ", 360.0),
        ("60", 60.0),  # a bare number from a compatible server: seconds
        ("0", 0.0),
    ],
)
def test_go_durations_become_seconds(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("6m0s", 1.0),
        ("1s", 1.0),
        ("2m59.56s", 0.01),
        ("1.234s", 0.001),
        ("12ms", 0.001),
        ("7.66ms", 0.00001),
        ("1h", 3600.0),
        ("60", 1.0),
        ("0.5", 0.1),
    ],
)
def test_a_go_duration_reset_knows_the_unit_of_its_last_digit(text: str, step: float) -> None:
    # A reset is rounded up to the unit it is written in: "6m0s" may be 5m59.2s.
    reset = go_duration_reset(text)
    assert reset is not None and reset[1] == pytest.approx(step)
    assert reset[0] == pytest.approx(parse_go_duration(text) or 0.0)


@pytest.mark.parametrize(
    ("text", "seconds", "step"),
    [
        ("2025-08-21T12:40:59Z", 59.0, 1.0),
        ("2025-08-21T12:40:59.5Z", 59.5, 0.1),
        ("2025-08-21T12:40:59.123+00:00", 59.123, 0.001),
        ("2025-08-21T12:40:59", 59.0, 1.0),
    ],
)
def test_an_rfc3339_reset_knows_the_unit_of_its_last_digit(
    text: str, seconds: float, step: float
) -> None:
    reset = rfc3339_reset(text, NOW)
    assert reset is not None and reset[1] == pytest.approx(step)
    assert reset[0] == pytest.approx(seconds)


@pytest.mark.parametrize(
    "junk", [None, "", "   ", "soon", "-1s", "1x", "s", "1s2", "nan", "inf", "6m0", "1..2s"]
)
def test_go_duration_junk_is_absent_not_an_exception(junk: str | None) -> None:
    assert parse_go_duration(junk) is None


def test_retry_after_ms_wins_over_seconds() -> None:
    headers = {"retry-after-ms": "150", "retry-after": "20"}
    assert retry_after(headers, NOW) == pytest.approx(0.15)


def test_retry_after_seconds() -> None:
    assert retry_after({"retry-after": "20"}, NOW) == 20.0
    assert retry_after({"retry-after": "1.5"}, NOW) == 1.5


def test_retry_after_http_date_is_measured_from_now() -> None:
    headers = {"retry-after": "Thu, 21 Aug 2025 12:40:30 GMT"}
    assert retry_after(headers, NOW) == pytest.approx(30.0)


def test_retry_after_in_the_past_or_negative_means_now() -> None:
    assert retry_after({"retry-after": "Thu, 21 Aug 2025 12:00:00 GMT"}, NOW) == 0.0
    assert retry_after({"retry-after": "-5"}, NOW) == 0.0
    assert retry_after({"retry-after-ms": "-5"}, NOW) == 0.0


def test_retry_after_junk_ms_falls_back_to_seconds_and_junk_is_none() -> None:
    assert retry_after({"retry-after-ms": "soon", "retry-after": "3"}, NOW) == 3.0
    assert retry_after({"retry-after": "whenever"}, NOW) is None
    assert retry_after({"retry-after": "nan"}, NOW) is None
    assert retry_after({}, NOW) is None


def test_retry_after_reads_httpx_headers_case_insensitively() -> None:
    headers = httpx.Headers({"Retry-After-Ms": "250", "Retry-After": "9"})
    assert retry_after(headers, NOW) == pytest.approx(0.25)


def test_openai_limits_read_both_windows() -> None:
    headers = httpx.Headers(
        {
            "X-RateLimit-Limit-Requests": "60",
            "X-RateLimit-Remaining-Requests": "59",
            "X-RateLimit-Reset-Requests": "1s",
            "X-RateLimit-Limit-Tokens": "150000",
            "X-RateLimit-Remaining-Tokens": "149984",
            "X-RateLimit-Reset-Tokens": "6m0s",
        }
    )
    report = openai_limits(headers)
    assert report.requests == Window(limit=60, remaining=59, reset_s=1.0, reset_step_s=1.0)
    assert report.tokens == Window(limit=150000, remaining=149984, reset_s=360.0, reset_step_s=1.0)
    assert report.requests_per_day is False
    assert not report.is_empty()


def test_groq_request_window_is_marked_daily() -> None:
    headers = {
        "x-ratelimit-limit-requests": "14400",
        "x-ratelimit-remaining-requests": "14370",
        "x-ratelimit-reset-requests": "2m59.56s",
    }
    report = openai_limits(headers, requests_per_day=True)
    assert report.requests_per_day is True
    assert report.requests is not None
    assert report.requests.reset_s == pytest.approx(179.56)
    assert report.tokens is None


def test_openai_limits_absent_and_junk() -> None:
    assert openai_limits({}).is_empty()
    report = openai_limits(
        {"x-ratelimit-limit-tokens": "lots", "x-ratelimit-reset-tokens": "later"}
    )
    assert report.tokens == Window(limit=None, remaining=None, reset_s=None)


def test_anthropic_limits_turn_rfc3339_resets_into_seconds_from_now() -> None:
    headers = httpx.Headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:01Z",
            "anthropic-ratelimit-input-tokens-limit": "30000",
            "anthropic-ratelimit-input-tokens-remaining": "0",
            "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "8000",
            "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:40:00.500000+00:00",
        }
    )
    report = anthropic_limits(headers, NOW)
    assert report.requests == Window(limit=50, remaining=49, reset_s=1.0, reset_step_s=1.0)
    assert report.input_tokens == Window(limit=30000, remaining=0, reset_s=59.0, reset_step_s=1.0)
    assert report.output_tokens is not None
    assert report.output_tokens.reset_s == pytest.approx(0.5)
    assert report.output_tokens.reset_step_s == pytest.approx(1e-6)
    assert report.tokens is None


def test_anthropic_reset_junk_or_past() -> None:
    assert rfc3339_reset("yesterday", NOW) is None
    assert rfc3339_reset("2025-08-21T12:00:00Z", NOW) == (0.0, 1.0)
    assert rfc3339_reset("2025-08-21T12:41:00", NOW) == (60.0, 1.0)  # naive means UTC
    assert anthropic_limits({}, NOW).is_empty()


def test_window_reset_prefers_the_named_window_then_the_latest_exhausted() -> None:
    report = openai_limits(
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert window_reset(report, "requests") == pytest.approx(0.12)
    assert window_reset(report, "tokens") == 360.0
    assert window_reset(report, "input_tokens") == 360.0  # falls back to combined tokens
    assert window_reset(report) == 360.0
    fresh = openai_limits({"x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1s"})
    assert window_reset(fresh) is None


def test_limits_from_headers_picks_the_family_present() -> None:
    assert limits_from_headers({}, NOW) is None
    openai = limits_from_headers({"x-ratelimit-limit-tokens": "10"}, NOW, requests_per_day=True)
    assert openai is not None and openai.requests_per_day
    anthropic = limits_from_headers({"anthropic-ratelimit-tokens-limit": "10"}, NOW)
    assert anthropic is not None and anthropic.tokens == Window(limit=10)

"""Rate-limit and retry headers, parsed into provider-neutral numbers (pure; no I/O).

Every function takes the response headers as a ``Mapping[str, str]`` and looks names up in
lower case: pass an ``httpx.Headers`` (case-insensitive already) or a dict whose keys were
lower-cased. Provider junk never raises: a value that does not parse is treated as absent.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache

from routerd.core.outcome import RateLimitReport, Window

__all__ = [
    "anthropic_limits",
    "go_duration_reset",
    "limits_from_headers",
    "openai_limits",
    "parse_go_duration",
    "retry_after",
    "rfc3339_reset",
    "window_reset",
]

_GO_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign, as Go prints it
    "μs": 1e-6,  # greek mu, which Go also accepts
    "ns": 1e-9,
}
# "ms" must be tried before "m", or "12ms" would read as 12 minutes and a stray "s".
_GO_PART = r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|μs|ns|h|m|s)"
_GO_FULL = re.compile(rf"(?:{_GO_PART})+")
_GO_PARTS = re.compile(_GO_PART)
# The fractional seconds of an RFC 3339 time ("12:40:59.123Z"), if written.
_RFC3339_FRACTION = re.compile(r"\d\d:\d\d:\d\d[.,](\d+)")


def parse_go_duration(text: str | None) -> float | None:
    """Seconds in a Go duration string ("6m0s", "12ms", "2m59.56s", "1h2m3s", "0s").

    A bare number is read as seconds, since some OpenAI-compatible servers send one.
    Returns None for anything else (negative, empty, garbage); never raises.
    """
    reset = go_duration_reset(text)
    return None if reset is None else reset[0]


def go_duration_reset(text: str | None) -> tuple[float, float] | None:
    """A Go duration as a reset: its seconds and the unit of its last digit ("6m0s": 1 s,
    "2m59.56s": 10 ms, "12ms": 1 ms), which is how far it may have been rounded."""
    if not text:
        return None
    return _go_reset(text.strip())


# Providers repeat the same few reset values ("1s", "6m0s"), so the regex work is cached.
@lru_cache(maxsize=512)
def _go_reset(text: str) -> tuple[float, float] | None:
    if _GO_FULL.fullmatch(text) is not None:
        parts = _GO_PARTS.findall(text)
        seconds = sum(float(num) * _GO_UNITS[unit] for num, unit in parts)
        number, unit = parts[-1]
        return seconds, _GO_UNITS[unit] * _digit_unit(number)
    bare = _seconds(text)
    return None if bare is None else (bare, _digit_unit(text))


def _digit_unit(number: str) -> float:
    """The value of the last digit of a decimal number: 1 for "12", 0.01 for "59.56"."""
    _, dot, decimals = number.partition(".")
    return 10.0 ** -len(decimals) if dot else 1.0


def _seconds(text: str) -> float | None:
    """A finite, non-negative float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _clamped(text: str) -> float | None:
    """A finite float clamped at 0 (a negative hint means "now"), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    value = _seconds(text)  # "149984.0" from a sloppy proxy still counts
    return int(value) if value is not None else None


def rfc3339_reset(text: str | None, now: float) -> tuple[float, float] | None:
    """An RFC 3339 reset as seconds from ``now`` (unix time), clamped at 0, and the unit of
    its last digit: a second for "...T12:40:59Z", a millisecond for "...T12:40:59.123Z"."""
    if not text:
        return None
    text = text.strip()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    fraction = _RFC3339_FRACTION.search(text)
    step = 10.0 ** -len(fraction.group(1)) if fraction is not None else 1.0
    return max(0.0, when.timestamp() - now), step


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """The provider's retry hint in seconds, as the official SDKs read it.

    ``retry-after-ms`` (float milliseconds) wins; then ``retry-after`` as seconds or as an
    HTTP date, measured from ``now`` (unix time). Clamped at 0; None when absent or junk.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = _clamped(millis)
        if value is not None:
            return value / 1000.0
    text = headers.get("retry-after")
    if text is None:
        return None
    value = _clamped(text)
    if value is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _window(
    limit: str | None, remaining: str | None, reset: tuple[float, float] | None
) -> Window | None:
    if reset is None:
        if limit is None and remaining is None:
            return None
        return Window(limit=_int(limit), remaining=_int(remaining))
    return Window(_int(limit), _int(remaining), reset[0], reset[1])


def openai_limits(headers: Mapping[str, str], *, requests_per_day: bool = False) -> RateLimitReport:
    """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers (OpenAI, Groq, ...).

    Resets are Go durations. Set ``requests_per_day`` where the request window is a day
    (Groq); the flag is carried on the report so the credential actor reads it right.
    """
    get = headers.get
    return RateLimitReport(
        requests=_window(
            get("x-ratelimit-limit-requests"),
            get("x-ratelimit-remaining-requests"),
            go_duration_reset(get("x-ratelimit-reset-requests")),
        ),
        tokens=_window(
            get("x-ratelimit-limit-tokens"),
            get("x-ratelimit-remaining-tokens"),
            go_duration_reset(get("x-ratelimit-reset-tokens")),
        ),
        requests_per_day=requests_per_day,
    )


def _anthropic_window(headers: Mapping[str, str], name: str, now: float) -> Window | None:
    prefix = f"anthropic-ratelimit-{name}-"
    return _window(
        headers.get(prefix + "limit"),
        headers.get(prefix + "remaining"),
        rfc3339_reset(headers.get(prefix + "reset"), now),
    )


def anthropic_limits(headers: Mapping[str, str], now: float) -> RateLimitReport:
    """The ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*`` headers.

    Resets are RFC 3339 timestamps, turned into seconds from ``now`` (unix time).
    """
    return RateLimitReport(
        requests=_anthropic_window(headers, "requests", now),
        tokens=_anthropic_window(headers, "tokens", now),
        input_tokens=_anthropic_window(headers, "input-tokens", now),
        output_tokens=_anthropic_window(headers, "output-tokens", now),
    )


def limits_from_headers(
    headers: Mapping[str, str], now: float, *, requests_per_day: bool = False
) -> RateLimitReport | None:
    """Whichever family of rate-limit headers the response carried; None when it had none."""
    report = openai_limits(headers, requests_per_day=requests_per_day)
    if report.is_empty():
        report = anthropic_limits(headers, now)
    return None if report.is_empty() else report


def window_reset(report: RateLimitReport, window: str | None = None) -> float | None:
    """Seconds until the named window resets; if unnamed or unknown, the latest exhausted one.

    ``window`` is "requests", "tokens", "input_tokens" or "output_tokens"; a named
    input/output window that was not reported falls back to the combined tokens window.
    """
    named = {
        "requests": report.requests,
        "tokens": report.tokens,
        "input_tokens": report.input_tokens or report.tokens,
        "output_tokens": report.output_tokens or report.tokens,
    }.get(window or "")
    if named is not None and named.reset_s is not None:
        return named.reset_s
    windows = (report.requests, report.tokens, report.input_tokens, report.output_tokens)
    exhausted = [w.reset_s for w in windows if w and w.remaining == 0 and w.reset_s is not None]
    return max(exhausted, default=None)

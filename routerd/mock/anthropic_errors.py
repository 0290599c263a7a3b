"""Anthropic's error details, worded as Anthropic words them (see /work/shared/PROVIDERS.md).

Every function returns the ``error`` object; the caller wraps it with the request id and
picks the status, which is named in each docstring.
"""

from __future__ import annotations

from datetime import UTC, datetime

from routerd.mock import anthropic_wire as wire

ORGANIZATION = "org-mock"

OVERLOADED = wire.ErrorDetail("overloaded_error", "Overloaded")

# The model faults that answer with an error status, by fault name.
SERVER_FAULTS: dict[str, tuple[int, wire.ErrorDetail]] = {
    "529": (529, OVERLOADED),
    "500": (500, wire.ErrorDetail("api_error", "Internal server error")),
    "503": (503, wire.ErrorDetail("api_error", "Service unavailable")),
}

_RATE_LIMIT_ADVICE = (
    "For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the "
    "response headers for current usage. Please reduce the prompt length or the maximum "
    "tokens requested, or try again later. You may also contact sales at "
    "https://claude.com/contact-sales to discuss your options for a rate limit increase."
)

# How each window's limit is named in a 429's message.
_UNITS = {
    "requests": "requests",
    "tokens": "tokens",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}


def missing_key() -> wire.ErrorDetail:
    """401 for a request without an x-api-key header."""
    return wire.ErrorDetail("authentication_error", "x-api-key header is required")


def invalid_key() -> wire.ErrorDetail:
    """401 for a key the mock never issued or has revoked; Anthropic does not quote it."""
    return wire.ErrorDetail("authentication_error", "invalid x-api-key")


def missing_version() -> wire.ErrorDetail:
    """400 for a request without the anthropic-version header."""
    return wire.ErrorDetail("invalid_request_error", "anthropic-version: header is required")


def no_credit() -> wire.ErrorDetail:
    """400 (not 402, not 429) for an account out of credit: what Anthropic really sends."""
    return wire.ErrorDetail(
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits.",
    )


def spend_limit(now: datetime) -> wire.ErrorDetail:
    """429 for a workspace past its monthly spend cap: no retry-after, back on the 1st."""
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    back = datetime(year, month, 1, tzinfo=UTC).strftime("%Y-%m-%d")
    return wire.ErrorDetail(
        "rate_limit_error",
        f"You have reached your specified API usage limits. You will regain access on {back} "
        "at 00:00 UTC.",
        wire.ErrorDetails("enforced_spend_limit_reached"),
    )


def invalid_request(message: str) -> wire.ErrorDetail:
    """400 for a body that does not parse or validate."""
    return wire.ErrorDetail("invalid_request_error", message)


def model_not_found(model: str) -> wire.ErrorDetail:
    """404 for a model the mock does not serve."""
    return wire.ErrorDetail("not_found_error", f"model: {model}")


def prompt_too_long(tokens: int, maximum: int) -> wire.ErrorDetail:
    """400 for a prompt longer than the window the request may use."""
    return wire.ErrorDetail(
        "invalid_request_error", f"prompt is too long: {tokens} tokens > {maximum} maximum"
    )


def long_context_not_allowed() -> wire.ErrorDetail:
    """429 for a long-context request on a key that may not make any: waiting will not help."""
    return wire.ErrorDetail(
        "rate_limit_error", "Extra usage is required for long context requests."
    )


def rate_limited(window: str, limit: int, model: str) -> wire.ErrorDetail:
    """429 for a full window (or a request larger than the window), named by its unit."""
    if window == "long_requests":
        what = f"rate limit for long context requests of {limit:,} requests per minute"
    else:
        what = f"rate limit of {limit:,} {_UNITS[window]} per minute"
    return wire.ErrorDetail(
        "rate_limit_error",
        f"This request would exceed your organization's {what} (org: {ORGANIZATION}, "
        f"model: {model}). {_RATE_LIMIT_ADVICE}",
    )

"""What an upstream attempt can come back as: the failure classes and the rate-limit report."""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class FailureClass(enum.StrEnum):
    """The failure classes of README.md's table; each has exactly one router action."""

    RATE_LIMITED = "rate_limited"
    LONG_CONTEXT_LIMITED = "long_context_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    AUTH_FAILED = "auth_failed"
    TARGET_DOWN = "target_down"
    CONTEXT_OVERFLOW = "context_overflow"
    BAD_REQUEST = "bad_request"


class Window(msgspec.Struct, frozen=True):
    """One rate-limit window as a provider reported it; ``reset_s`` is seconds from the response.

    ``reset_step_s`` is the unit the reset was written in ("2025-08-21T12:40:59Z": a second;
    "1.234s": a millisecond). Providers round resets up so that a client waiting one out is
    never early, so the true reset may be up to that much earlier than the reported one.
    """

    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None
    reset_step_s: float = 0.001


class RateLimitReport(msgspec.Struct, frozen=True):
    """The rate-limit headers of one response, provider-neutral.

    ``requests_per_day`` is set where the provider's request window is a day (Groq).
    """

    requests: Window | None = None
    tokens: Window | None = None
    input_tokens: Window | None = None
    output_tokens: Window | None = None
    requests_per_day: bool = False

    def is_empty(self) -> bool:
        """True when the response carried no rate-limit header at all."""
        return (
            self.requests is None
            and self.tokens is None
            and self.input_tokens is None
            and self.output_tokens is None
        )


class Failure(msgspec.Struct, frozen=True):
    """A classified upstream failure.

    ``retry_after`` is the provider's own hint in seconds (retry-after-ms, retry-after, a reset
    header, a body retryDelay, or a quota reset), None when it gave none. ``message`` has been
    scrubbed of the credential's key. ``oversized`` marks a 429 for a single request larger
    than this key's whole window: waiting on the same key will not help.
    """

    cls: FailureClass
    message: str
    status: int | None = None
    retry_after: float | None = None
    limits: RateLimitReport | None = None
    oversized: bool = False
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class UpstreamFailure(Exception):
    """Raised by an upstream adapter; carries the classified failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

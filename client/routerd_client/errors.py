"""The client's exceptions: one RouterdError base and a subclass per failure class."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from .protocol import Attempt, Error


class RouterdError(Exception):
    """A request to routerd failed; ``kind`` names the failure class.

    ``attempts`` is the trail of upstream attempts the daemon made (target, credential label,
    class, status) — never a secret. ``retry_after`` is the daemon's hint, in seconds, for
    when the same request could succeed; ``details`` carries class-specific data.
    """

    default_kind: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        attempts: Iterable[Attempt] = (),
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: str = kind if kind is not None else self.default_kind
        self.message: str = message
        self.attempts: list[Attempt] = list(attempts)
        self.retry_after: float | None = retry_after
        self.details: dict[str, Any] | None = details

    def __str__(self) -> str:
        if not self.attempts:
            return self.message
        return f"{self.message} [{'; '.join(map(_describe, self.attempts))}]"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments defeat BaseException's default pickling, and errors do cross
        # process pools in agent frameworks.
        return (
            _rebuild,
            (type(self), self.message, self.kind, self.attempts, self.retry_after, self.details),
        )


def _describe(attempt: Attempt) -> str:
    """Render one attempt as ``target/credential: class (status)``."""
    text = f"{attempt.target}/{attempt.credential}: {attempt.outcome}"
    return text if attempt.status is None else f"{text} ({attempt.status})"


def _rebuild(
    cls: type[RouterdError],
    message: str,
    kind: str,
    attempts: list[Attempt],
    retry_after: float | None,
    details: dict[str, Any] | None,
) -> RouterdError:
    return cls(message, kind=kind, attempts=attempts, retry_after=retry_after, details=details)


class RateLimited(RouterdError):
    """Every usable credential's rate-limit window was full within the deadline."""

    default_kind = "rate_limited"


class LongContextLimited(RouterdError):
    """The long-context lane of every credential that could hold the request is full."""

    default_kind = "long_context_limited"


class ContextTierDowngrade(LongContextLimited):
    """No long-context window is free now; a shorter request would be served.

    ``largest_window`` is the largest context window available now and
    ``long_lane_back_in`` the seconds until a long-context lane is expected back.
    """

    default_kind = "context_tier_downgrade"

    @property
    def largest_window(self) -> int | None:
        """The largest context window (tokens) a request could use right now."""
        value = (self.details or {}).get("largest_window")
        return int(value) if value is not None else None

    @property
    def long_lane_back_in(self) -> float | None:
        """Seconds until a long-context lane is expected to be usable again."""
        value = (self.details or {}).get("long_lane_back_in")
        return float(value) if value is not None else None


class QuotaExhausted(RouterdError):
    """No credential that could serve the request has money or daily quota left."""

    default_kind = "quota_exhausted"


class AuthFailed(RouterdError):
    """The credentials were rejected as invalid or revoked."""

    default_kind = "auth_failed"


class TargetDown(RouterdError):
    """Every target in the chain was unhealthy (5xx, overloaded, unreachable, cut stream)."""

    default_kind = "target_down"


class ContextOverflow(RouterdError):
    """The request is too big for every model in the chain."""

    default_kind = "context_overflow"


class BadRequest(RouterdError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    default_kind = "bad_request"


class UnknownRoute(BadRequest):
    """The daemon has no route of that name."""

    default_kind = "unknown_route"


class ProtocolError(RouterdError):
    """The client and the daemon do not understand each other (version, framing, schema)."""

    default_kind = "protocol_error"


class DeadlineExceeded(RouterdError):
    """The request's deadline (or the client's timeout) passed before a reply."""

    default_kind = "deadline_exceeded"


class Cancelled(RouterdError):
    """The request was cancelled."""

    default_kind = "cancelled"


class Unavailable(RouterdError):
    """routerd is not reachable, is shutting down, or closed the connection."""

    default_kind = "unavailable"


class Forbidden(RouterdError):
    """The daemon does not let this user in ([server] allowed_users / allowed_groups)."""

    default_kind = "forbidden"


class ConfigRejected(RouterdError):
    """`routerd reload`: the config file has errors (each listed); the running one stays."""

    default_kind = "config_error"


class InternalError(RouterdError):
    """The daemon failed in a way it did not expect."""

    default_kind = "internal"


_BY_KIND: dict[str, type[RouterdError]] = {
    cls.default_kind: cls
    for cls in (
        RateLimited,
        LongContextLimited,
        ContextTierDowngrade,
        QuotaExhausted,
        AuthFailed,
        TargetDown,
        ContextOverflow,
        BadRequest,
        UnknownRoute,
        ProtocolError,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        Forbidden,
        ConfigRejected,
        InternalError,
    )
}


def error_from_message(err: Error) -> RouterdError:
    """Turn a daemon Error message into the RouterdError subclass named by its class."""
    cls = _BY_KIND.get(err.kind, RouterdError)
    return cls(
        err.message or err.kind,
        kind=err.kind,
        attempts=err.attempts,
        retry_after=err.retry_after,
        details=err.details,
    )

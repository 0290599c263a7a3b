"""What each Refused kind becomes over HTTP: a status, headers, and each API's error body.

One table serves both APIs so the two fronts cannot drift apart. The statuses are the ones
the official SDKs already understand (openai-python, anthropic-sdk-python map them to their
own exception classes), with three choices of routerd's own:

- ``unknown_route`` is a 404, as OpenAI and Anthropic answer an unknown model.
- ``auth_failed`` (every key of the route rejected upstream) is a 502, not a 401: an SDK
  reads 401 as "the key *you* gave is wrong", and the client's key to routerd was fine.
- Every error that comes from the dispatcher carries ``x-should-retry: false``: routerd has
  already switched keys, fallen back and waited within the deadline, so an SDK retrying on
  its own would only multiply routerd's attempts. ``retry-after`` and ``retry-after-ms`` are
  still sent, for callers that schedule their own retry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from routerd.core.errors import Refused
from routerd.fronts.http.wire import Api, encode


@dataclass(frozen=True, slots=True)
class Mapping:
    """One kind's status and error type in each API (``code`` is OpenAI's error code)."""

    openai_status: int
    openai_type: str
    openai_code: str | None
    anthropic_status: int
    anthropic_type: str


_SERVER_ERROR = Mapping(500, "server_error", None, 500, "api_error")

KINDS: dict[str, Mapping] = {
    "bad_request": Mapping(400, "invalid_request_error", None, 400, "invalid_request_error"),
    "unknown_route": Mapping(
        404, "invalid_request_error", "model_not_found", 404, "not_found_error"
    ),
    "context_overflow": Mapping(
        400, "invalid_request_error", "context_length_exceeded", 400, "invalid_request_error"
    ),
    "rate_limited": Mapping(429, "requests", "rate_limit_exceeded", 429, "rate_limit_error"),
    "long_context_limited": Mapping(429, "tokens", "rate_limit_exceeded", 429, "rate_limit_error"),
    "context_tier_downgrade": Mapping(
        429, "tokens", "context_tier_downgrade", 429, "rate_limit_error"
    ),
    # Anthropic's own answer to an empty balance is a 402 billing_error.
    "quota_exhausted": Mapping(
        429, "insufficient_quota", "insufficient_quota", 402, "billing_error"
    ),
    "auth_failed": Mapping(502, "server_error", "upstream_auth_failed", 502, "api_error"),
    "target_down": Mapping(503, "server_error", "target_down", 529, "overloaded_error"),
    "unavailable": Mapping(503, "server_error", "unavailable", 529, "overloaded_error"),
    "deadline_exceeded": Mapping(504, "timeout", "deadline_exceeded", 504, "timeout_error"),
    "cancelled": _SERVER_ERROR,
    "protocol_error": _SERVER_ERROR,
    "internal": _SERVER_ERROR,
    # Errors of the front itself, before any routing.
    "unauthenticated": Mapping(
        401, "invalid_request_error", "invalid_api_key", 401, "authentication_error"
    ),
    "not_found": Mapping(404, "invalid_request_error", None, 404, "not_found_error"),
    "method_not_allowed": Mapping(405, "invalid_request_error", None, 405, "invalid_request_error"),
    "request_too_large": Mapping(
        413, "invalid_request_error", "request_too_large", 413, "request_too_large"
    ),
    # The client stopped sending its body: the SDKs retry a 408 on a new connection.
    "request_timeout": Mapping(
        408, "invalid_request_error", "request_timeout", 408, "timeout_error"
    ),
}


@dataclass(frozen=True, slots=True)
class HttpError:
    """An error ready to send: status, headers, and the JSON body (or the SSE error event)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: dict[str, Any]

    def encode(self) -> bytes:
        """The body as JSON bytes."""
        return encode(self.body)


def front_error(api: Api, kind: str, message: str, *, retry: bool | None = None) -> HttpError:
    """An error the front raises itself (auth, routing of paths, body size, shutting down)."""
    return _build(api, kind, message, None, retry=retry)


def routed_error(api: Api, exc: Refused) -> HttpError:
    """The HTTP form of an error the dispatcher raised; the SDK is told not to retry it."""
    return _build(api, exc.kind, _message(api, exc), exc, retry=False)


def _build(
    api: Api, kind: str, message: str, exc: Refused | None, *, retry: bool | None
) -> HttpError:
    mapping = KINDS.get(kind, _SERVER_ERROR)
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if retry is not None:
        headers.append((b"x-should-retry", b"true" if retry else b"false"))
    if exc is not None and exc.retry_after is not None:
        seconds = max(0.0, exc.retry_after)
        headers.append((b"retry-after", str(math.ceil(seconds)).encode()))
        headers.append((b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()))
    extra = _routerd_fields(kind, exc)
    body: dict[str, Any]
    if api == "openai":
        status = mapping.openai_status
        body = {
            "error": {
                "message": message,
                "type": mapping.openai_type,
                "param": "messages" if kind == "context_overflow" else None,
                "code": mapping.openai_code,
                "routerd": extra,
            }
        }
    else:
        status = mapping.anthropic_status
        body = {
            "type": "error",
            "error": {"type": mapping.anthropic_type, "message": message, "routerd": extra},
        }
    return HttpError(status, headers, body)


def _routerd_fields(kind: str, exc: Refused | None) -> dict[str, Any]:
    """routerd's own account (kind, attempt trail, hint): SDKs keep it in ``exc.body``."""
    fields: dict[str, Any] = {"kind": kind}
    if exc is not None:
        fields["attempts"] = msgspec.to_builtins(exc.attempts)
        if exc.retry_after is not None:
            fields["retry_after"] = exc.retry_after
        if exc.details:
            fields["details"] = exc.details
    return fields


def _message(api: Api, exc: Refused) -> str:
    """The error message, worded for context overflow the way agents recognise it."""
    if exc.kind != "context_overflow":
        return exc.message
    details = exc.details or {}
    requested, largest = details.get("requested_tokens"), details.get("largest_window")
    if api == "anthropic":
        # Claude Code and other Anthropic agents compact the conversation on this phrase.
        if isinstance(requested, int) and isinstance(largest, int):
            return f"prompt is too long: {requested} tokens > {largest} maximum ({exc.message})"
        return f"prompt is too long ({exc.message})"
    if isinstance(requested, int) and isinstance(largest, int):
        return (
            f"This model's maximum context length is {largest} tokens. However, your messages "
            f"resulted in about {requested} tokens. ({exc.message})"
        )
    return f"maximum context length exceeded ({exc.message})"

"""Read any provider's error body into the few fields that classify it, whatever its shape.

Anthropic's ``{"type": "error", "error": {...}}``, OpenAI's ``{"error": {...}}``, google.rpc
statuses with their detail messages, OpenRouter's metadata, Ollama's ``{"error": "text"}``,
vLLM's flat body, Gemini's list-wrapped error and plain text or HTML pages all come out as
one ``ErrorBody``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from routerd.core.limits import parse_go_duration

__all__ = ["MESSAGE_LIMIT", "ErrorBody", "parse_error_body"]

# The longest failure message routerd passes on (classify cuts to it).
MESSAGE_LIMIT = 500
# A non-JSON body is cut to this many characters before it is read as one line of text.
_PLAIN_TEXT_LIMIT = 8 * MESSAGE_LIMIT

_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"\s+")

# What a body's own type/code/status implies when no HTTP error status applies.
_IMPLIED_STATUS = {
    # Anthropic error.type
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    # OpenAI error.code / error.type
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "tokens": 429,
    "requests": 429,
    "context_length_exceeded": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
    "server_error": 500,
    # google.rpc status
    "RESOURCE_EXHAUSTED": 429,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


@dataclass(slots=True)
class ErrorBody:
    """The fields of an error body that matter, whatever shape the provider used."""

    message: str = ""
    type: str | None = None
    code: str | None = None
    number: int | None = None  # an HTTP-like code inside the body (OpenRouter, Gemini)
    param: str | None = None
    status: str | None = None  # google.rpc status name
    error_code: str | None = None  # Anthropic error.details.error_code
    reason: str | None = None  # google.rpc.ErrorInfo reason
    quota_ids: list[str] = field(default_factory=list)
    retry_delay: float | None = None  # google.rpc.RetryInfo
    reset_at: float | None = None  # OpenRouter metadata.headers X-RateLimit-Reset, unix s
    limit_source: str | None = None
    provider: str | None = None
    raw: str | None = None  # OpenRouter metadata.raw: the upstream provider's own error
    request_id: str | None = None

    def implied_status(self) -> int | None:
        """The HTTP status the body itself names or implies, if any."""
        if self.number is not None:
            return self.number
        for name in (self.code, self.type, self.status):
            if name is not None and name in _IMPLIED_STATUS:
                return _IMPLIED_STATUS[name]
        return None

    def haystack(self) -> str:
        """Everything worth matching, lower-cased: codes first, then the words."""
        words = (self.type, self.code, self.error_code, self.reason, self.limit_source)
        return " ".join(p for p in (*words, self.message, self.raw) if p).lower()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _plain_text(text: str) -> str:
    """A one-line version of a non-JSON body; an HTML error page is named by its title."""
    if text.lstrip()[:1] == "<":
        title = _HTML_TITLE.search(text)
        if title is not None:
            text = title.group(1)
    return _SPACES.sub(" ", text).strip()


def _epoch(value: object) -> float | None:
    """A reset stamp in unix seconds, from seconds or milliseconds (OpenRouter sends ms)."""
    if not isinstance(value, str | int | float):
        return None
    try:
        stamp = float(value)
    except ValueError:
        return None
    return stamp / 1000.0 if stamp > 1e11 else stamp


def parse_error_body(body: bytes | str | dict[str, Any] | None) -> ErrorBody:
    """The fields of ``body`` (raw bytes, text or decoded JSON) that classify it."""
    data: Any = body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        stripped = body.strip()
        if not stripped:
            return ErrorBody()
        data = None
        if stripped[0] in "{[":
            try:
                data = msgspec.json.decode(stripped)
            except msgspec.DecodeError:
                data = None
        if data is None:
            return ErrorBody(message=_plain_text(stripped[:_PLAIN_TEXT_LIMIT]))
    # Gemini's OpenAI-compatible endpoint wraps the error in a list.
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        return ErrorBody(message=_text(data) or "")
    parsed = ErrorBody(request_id=_text(data.get("request_id")))
    error = data.get("error")
    if isinstance(error, dict):
        source = error
    else:
        # {"error": "text"} (Ollama) or a flat body (vLLM's {"object": "error", ...}).
        source = data
        parsed.message = _text(error) or ""
    parsed.message = (
        parsed.message
        or _text(source.get("message"))
        or _text(data.get("detail"))
        or _text(data.get("message"))
        or ""
    )
    kind = _text(source.get("type"))
    parsed.type = kind if kind != "error" else None  # Anthropic's envelope says "error"
    code = source.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        parsed.number = code if 100 <= code <= 599 else None
    elif isinstance(code, str) and code:
        if code.isdigit() and 100 <= int(code) <= 599:
            parsed.number = int(code)
        else:
            parsed.code = code
    parsed.param = _text(source.get("param"))
    parsed.status = _text(source.get("status"))
    _read_details(parsed, source.get("details"))
    _read_metadata(parsed, source.get("metadata"))
    return parsed


def _read_details(parsed: ErrorBody, details: object) -> None:
    if isinstance(details, dict):  # Anthropic: {"error_code": "enforced_spend_limit_reached"}
        parsed.error_code = _text(details.get("error_code"))
        return
    if not isinstance(details, list):
        return
    for item in details:  # google.rpc detail messages
        if not isinstance(item, dict):
            continue
        kind = item.get("@type")
        if not isinstance(kind, str):
            continue
        if kind.endswith("QuotaFailure"):
            for violation in item.get("violations") or ():
                if isinstance(violation, dict) and (quota := _text(violation.get("quotaId"))):
                    parsed.quota_ids.append(quota)
        elif kind.endswith("RetryInfo"):
            parsed.retry_delay = parse_go_duration(_text(item.get("retryDelay")))
        elif kind.endswith("ErrorInfo"):
            parsed.reason = _text(item.get("reason"))


def _read_metadata(parsed: ErrorBody, metadata: object) -> None:
    if not isinstance(metadata, dict):
        return
    raw = metadata.get("raw")
    if isinstance(raw, str):
        parsed.raw = raw
    elif raw is not None:
        parsed.raw = msgspec.json.encode(raw).decode()
    parsed.provider = _text(metadata.get("provider_name"))
    parsed.limit_source = _text(metadata.get("limit_source"))
    headers = metadata.get("headers")
    if isinstance(headers, dict):
        lowered = {str(k).lower(): v for k, v in headers.items()}
        parsed.reset_at = _epoch(lowered.get("x-ratelimit-reset"))

"""Turn any provider's error response into one classified, key-free Failure (README's table).

The rules, in the order they are tried:

- Out of money or daily quota (``quota_exhausted``): 402; codes insufficient_quota,
  credit_balance_exhausted, billing_*, *spend_limit*; Anthropic's
  ``enforced_spend_limit_reached``, "credit balance is too low" and "You have reached your
  specified API usage limits" (a 400!); Gemini RESOURCE_EXHAUSTED naming a ...PerDay...
  quota; a 429 naming a per-day window (OpenRouter free-models-per-day, Groq TPD).
- 429 naming long context: ``long_context_limited``. Any other 429: ``rate_limited``,
  ``oversized`` when one request is larger than the key's whole window ("Request too
  large ... Limit N, Requested M").
- 401/403: ``auth_failed`` (403 for a moderation flag is the request's fault: bad_request).
- 400/413/422 that say the prompt is too long: ``context_overflow``.
- 408, 409, 5xx, 529: ``target_down``. A 400/404 saying the *model* does not exist is
  ``target_down`` too: the router, not the client, chose the model, so the target is
  misconfigured or withdrawn and the next target in the chain should serve. Any other 404
  (a file or response id the client named) is the request's fault.
- Other 4xx: ``bad_request``.

An error that arrives inside a successful response (``status`` None or < 400: a mid-stream
``error`` event, an HTTP 200 whose body is an error) is classified from its body alone, and
is ``target_down`` unless the body clearly says otherwise: the request was accepted, so it
cannot be a bad request.

Every message and detail is scrubbed of the credential's key before it leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from routerd.core.errorbody import MESSAGE_LIMIT, ErrorBody, parse_error_body
from routerd.core.limits import limits_from_headers, parse_go_duration, retry_after, window_reset
from routerd.core.outcome import Failure, FailureClass, RateLimitReport

__all__ = ["REDACTED", "classify", "scrub", "transport_failure"]

REDACTED = "[redacted]"
# A run of this many key characters in a message counts as a leak even without the rest.
_FRAGMENT = 12
_DETAIL_LIMIT = 200

_QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "enforced_spend_limit_reached",
        "insufficient_balance",
        "insufficient_credits",
        "payment_required",
    }
)
_QUOTA_TEXT = re.compile(
    r"credit balance is too low|insufficient (?:credits|balance|funds)"
    r"|reached your specified (?:\w+ )?api usage limits|spend limit"
)
_REGAIN_ACCESS = re.compile(r"regain access on (\d{4}-\d{2}-\d{2}) at (\d{1,2}:\d{2}) utc")
_PER_DAY = re.compile(r"per[ -]day|daily|\((?:[io]?t|r)pd\)")
_LONG_CONTEXT = re.compile(r"long[ -]context")
_TOO_LARGE = re.compile(r"request too large")
_LIMIT_REQUESTED = re.compile(r"limit:? ?([\d,]+),? requested:? ?([\d,]+)")
_CONTEXT = re.compile(
    r"context[_ -]length|context window|prompt is too long|request_too_large"
    r"|exceeds the maximum number of tokens|reduce the length of the (?:messages|prompt)"
)
_MODEL_MISSING = re.compile(
    r"model_not_found|no endpoints found|not a valid model|invalid model|unknown model"
    r"|no such model|not_found_error model:|model\b[^.]{0,100}?(?:does not exist|not found)"
)
_BAD_KEY = re.compile(r"api[ _]key not valid|api_key_invalid|invalid api key|incorrect api key")
_MODERATION = re.compile(r"flagged|moderation")
_GO_DELAY = re.compile(
    r"(?:try again|retry) in (?:about )?"
    r"(\d[\d.]*(?:ms|us|µs|ns|h|m|s)(?:\d[\d.]*(?:ms|us|µs|ns|h|m|s))*)(?![a-z])"
)
_WORD_DELAY = re.compile(
    r"(?:try again|retry) in (?:about )?(\d+(?:\.\d+)?) ?"
    r"(millisecond|second|sec|minute|min|hour)s?\b"
)
_WORD_UNITS = {"millisecond": 1e-3, "second": 1.0, "sec": 1.0, "minute": 60.0, "min": 60.0}
_WANT_TOKENS = re.compile(r"\b(input |output )?tokens per\b|\(([io])?tp[md]\)")
_WANT_REQUESTS = re.compile(r"requests per\b|\(rp[md]\)")
_WINDOW_TYPES = frozenset({"requests", "tokens", "input_tokens", "output_tokens"})


def _is_quota(parsed: ErrorBody, text: str) -> bool:
    for name in (parsed.code, parsed.type, parsed.error_code):
        if name and (name in _QUOTA_CODES or "spend_limit" in name or name.startswith("billing")):
            return True
    if any("PerDay" in quota for quota in parsed.quota_ids):
        return True
    return _QUOTA_TEXT.search(text) is not None


def _decide(status: int | None, parsed: ErrorBody, text: str) -> tuple[FailureClass, bool]:
    """The failure class (and the oversized flag) for an effective status and body."""
    client_error = status is None or 400 <= status < 500
    if client_error and _is_quota(parsed, text):
        return FailureClass.QUOTA_EXHAUSTED, False
    if status == 402:
        return FailureClass.QUOTA_EXHAUSTED, False
    if status == 429:
        if _LONG_CONTEXT.search(text):
            return FailureClass.LONG_CONTEXT_LIMITED, False
        if _TOO_LARGE.search(text):
            return FailureClass.RATE_LIMITED, _oversized(text)
        if _PER_DAY.search(text):
            return FailureClass.QUOTA_EXHAUSTED, False
        return FailureClass.RATE_LIMITED, False
    if status in (401, 403):
        if status == 403 and _MODERATION.search(text):
            return FailureClass.BAD_REQUEST, False
        return FailureClass.AUTH_FAILED, False
    if status == 413 or (status in (None, 400, 422) and _CONTEXT.search(text)):
        return FailureClass.CONTEXT_OVERFLOW, False
    if status in (400, 404) and _MODEL_MISSING.search(text):
        return FailureClass.TARGET_DOWN, False
    if status == 400 and _BAD_KEY.search(text):
        return FailureClass.AUTH_FAILED, False
    if status is None or status in (408, 409) or status >= 500 or status < 400:
        return FailureClass.TARGET_DOWN, False
    return FailureClass.BAD_REQUEST, False


def _oversized(text: str) -> bool:
    """True unless the message's own numbers show the request fits the window."""
    numbers = _LIMIT_REQUESTED.search(text)
    if numbers is None:
        return True
    limit, requested = (int(n.replace(",", "")) for n in numbers.groups())
    return requested > limit


def _message_delay(text: str) -> float | None:
    """'Please try again in 174ms' / 'in 6m0s' / 'Please retry in 20.04s' / 'in 2 minutes'."""
    found = _GO_DELAY.search(text)
    if found is not None:
        return parse_go_duration(found.group(1))
    found = _WORD_DELAY.search(text)
    if found is not None:
        return float(found.group(1)) * _WORD_UNITS.get(found.group(2), 3600.0)
    return None


def _regain_access(text: str, now: float) -> float | None:
    found = _REGAIN_ACCESS.search(text)
    if found is None:
        return None
    try:
        when = datetime.fromisoformat(f"{found.group(1)}T{found.group(2).zfill(5)}:00")
    except ValueError:
        return None
    return max(0.0, when.replace(tzinfo=UTC).timestamp() - now)


def _named_window(parsed: ErrorBody, text: str) -> str | None:
    """Which window a 429 is about: OpenAI's error.type, else the words of the message."""
    if parsed.type in _WINDOW_TYPES:
        return parsed.type
    tokens = _WANT_TOKENS.search(text)
    if tokens is not None:
        side = tokens.group(1) or tokens.group(2) or ""
        return "input_tokens" if side.startswith("i") else "output_tokens" if side else "tokens"
    return "requests" if _WANT_REQUESTS.search(text) else None


def _retry_hint(
    cls: FailureClass,
    headers: Mapping[str, str],
    parsed: ErrorBody,
    text: str,
    limits: RateLimitReport | None,
    now: float,
) -> float | None:
    hint = retry_after(headers, now)
    if cls is FailureClass.QUOTA_EXHAUSTED:
        if parsed.reset_at is not None:
            return max(0.0, parsed.reset_at - now)
        regain = _regain_access(text, now)
        if regain is not None:
            return regain
        # On a per-day violation Gemini's RetryDelay is the per-minute hint (~20 s), not the
        # day's reset; trusting it would re-hit an exhausted key all day long.
        if parsed.retry_delay is not None and not any("PerDay" in q for q in parsed.quota_ids):
            return parsed.retry_delay
        return hint if hint is not None else _message_delay(text)
    if cls in (FailureClass.RATE_LIMITED, FailureClass.LONG_CONTEXT_LIMITED):
        if hint is not None:
            return hint
        if limits is not None:
            hint = window_reset(limits, _named_window(parsed, text))
        if hint is None:
            hint = _message_delay(text)
        if hint is None:
            hint = parsed.retry_delay
        if hint is None and parsed.reset_at is not None:
            hint = max(0.0, parsed.reset_at - now)
    return hint


def scrub(text: str, key: str) -> str:
    """``text`` with the key, and any run of 12+ of its characters, replaced by [redacted].

    The fragment rule catches keys that were echoed cut, masked at one end, or escaped
    (a key file's trailing newline shows up as ``\\n`` in a repr).
    """
    if not key or not text:
        return text
    if key in text:
        text = text.replace(key, REDACTED)
    core = key.strip()
    if core != key and core and core in text:
        text = text.replace(core, REDACTED)
    if len(core) < _FRAGMENT + 4:
        return text
    windows: dict[str, int] = {}
    for i in range(len(core) - _FRAGMENT + 1):
        windows.setdefault(core[i : i + _FRAGMENT], i)
    out: list[str] = []
    start = i = 0
    last = len(text) - _FRAGMENT
    while i <= last:
        at = windows.get(text[i : i + _FRAGMENT])
        if at is None:
            i += 1
            continue
        end, k = i + _FRAGMENT, at + _FRAGMENT
        while end < len(text) and k < len(core) and text[end] == core[k]:
            end += 1
            k += 1
        out.append(text[start:i])
        out.append(REDACTED)
        start = i = end
    if not out:
        return text
    out.append(text[start:])
    return "".join(out)


def _clean(text: str, key: str, limit: int) -> str:
    # Scrub a generous prefix, not the whole body: an HTML error page can be megabytes.
    text = scrub(text[: 4 * limit], key)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _details(parsed: ErrorBody, headers: Mapping[str, str], key: str) -> dict[str, Any]:
    details: dict[str, Any] = {}
    for name, value in (
        ("type", parsed.type),
        ("code", parsed.code if parsed.code is not None else parsed.number),
        ("param", parsed.param),
        ("status", parsed.status),
        ("error_code", parsed.error_code),
        ("reason", parsed.reason),
        ("limit_source", parsed.limit_source),
        ("provider", parsed.provider),
        ("retry_delay_s", parsed.retry_delay),
        (
            "request_id",
            parsed.request_id or headers.get("request-id") or headers.get("x-request-id"),
        ),
    ):
        if value is not None:
            details[name] = _clean(value, key, _DETAIL_LIMIT) if isinstance(value, str) else value
    if parsed.quota_ids:
        details["quota_ids"] = [_clean(q, key, _DETAIL_LIMIT) for q in parsed.quota_ids]
    return details


def classify(
    status: int | None,
    headers: Mapping[str, str] | None,
    body: bytes | str | dict[str, Any] | None,
    *,
    key: str,
    now: float,
    requests_per_day: bool = False,
) -> Failure:
    """Classify one provider error; the result never contains ``key``.

    ``status`` is the HTTP status, or None for an error event inside an accepted stream.
    ``headers`` are the response's headers (an ``httpx.Headers``, or a dict with lower-cased
    keys); ``now`` is unix time, for HTTP-date and timestamp resets. ``requests_per_day``
    marks providers whose request window is a day (Groq) on the parsed limits.
    """
    headers = headers if headers is not None else {}
    parsed = parse_error_body(body)
    text = parsed.haystack()
    in_band = status is None or status < 400
    effective = parsed.implied_status() if in_band else status
    cls, oversized = _decide(effective, parsed, text)
    if in_band and cls is FailureClass.BAD_REQUEST:
        cls = FailureClass.TARGET_DOWN
    limits = limits_from_headers(headers, now, requests_per_day=requests_per_day)
    message = parsed.message
    if parsed.raw and parsed.raw not in message:
        message = f"{message}: {parsed.raw}" if message else parsed.raw
    if not message:
        message = f"HTTP {status}" if status is not None else "error event without a message"
    return Failure(
        cls=cls,
        message=_clean(message, key, MESSAGE_LIMIT),
        status=status,
        retry_after=_retry_hint(cls, headers, parsed, text, limits, now),
        limits=limits,
        oversized=oversized,
        details=_details(parsed, headers, key),
    )


def transport_failure(kind: str, detail: str = "", *, key: str) -> Failure:
    """A ``target_down`` failure for a connection that failed before or during a reply.

    ``kind`` names what happened ("connect error", "read timeout after 30s", "stream cut");
    ``detail`` is the underlying error's text, scrubbed of ``key``.
    """
    message = f"{kind}: {detail}" if detail else kind
    return Failure(
        cls=FailureClass.TARGET_DOWN,
        message=_clean(message, key, MESSAGE_LIMIT),
        details={"transport": kind},
    )

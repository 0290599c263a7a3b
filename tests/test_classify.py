"""Error classification: real provider bodies in, the router's failure class out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from routerd.core.classify import classify, scrub, transport_failure
from routerd.core.errorbody import MESSAGE_LIMIT
from routerd.core.outcome import Failure, FailureClass, UpstreamFailure

NOW = datetime(2025, 8, 21, 12, 40, 0, tzinfo=UTC).timestamp()
KEY = "sk-proj-Q2x7LmN4pR8sT1vW3yZ5aB6cD9eF0gH2jK4lM7nP1qR3sT5uV8wX0yZ2"

C = FailureClass


def run(
    status: int | None,
    body: bytes | str | dict[str, Any] | None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Failure:
    return classify(status, httpx.Headers(headers or {}), body, key=KEY, now=NOW, **kw)


def openai_error(
    message: str, type_: str | None, code: str | None, param: str | None = None
) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def anthropic_error(type_: str, message: str, **extra: Any) -> bytes:
    return msgspec.json.encode(
        {
            "type": "error",
            "error": {"type": type_, "message": message, **extra},
            "request_id": "req_011CZf8TJf84hAUziB6LuRoc",
        }
    )


# --- rate limited ---------------------------------------------------------------------


OPENAI_TPM = openai_error(
    "Rate limit reached for gpt-4.1 in organization org-abc on tokens per min (TPM): "
    "Limit 30000, Used 29000, Requested 1500. Please try again in 1.2s.",
    "tokens",
    "rate_limit_exceeded",
)
RATE_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "6m0s",
}


def test_openai_429_honours_retry_after_ms_first() -> None:
    failure = run(429, OPENAI_TPM, {**RATE_HEADERS, "retry-after-ms": "150", "retry-after": "1"})
    assert failure.cls is C.RATE_LIMITED
    assert failure.retry_after == pytest.approx(0.15)
    assert failure.status == 429
    assert failure.details["code"] == "rate_limit_exceeded"
    assert failure.details["type"] == "tokens"
    assert not failure.oversized


def test_openai_429_without_retry_after_uses_the_window_it_names() -> None:
    # type "tokens": the tokens window's reset, not the (shorter) requests one.
    assert run(429, OPENAI_TPM, RATE_HEADERS).retry_after == pytest.approx(360.0)
    requests = openai_error(
        "Rate limit reached for gpt-4.1 on requests per min (RPM): Limit 500, Used 500, "
        "Requested 1.",
        "requests",
        "rate_limit_exceeded",
    )
    assert run(429, requests, RATE_HEADERS).retry_after == pytest.approx(0.12)


def test_429_of_unclear_window_waits_for_the_latest_exhausted_one() -> None:
    body = openai_error("Too many requests", None, "rate_limit_exceeded")
    assert run(429, body, RATE_HEADERS).retry_after == pytest.approx(360.0)
    only_requests = {**RATE_HEADERS, "x-ratelimit-remaining-tokens": "9000"}
    assert run(429, body, only_requests).retry_after == pytest.approx(0.12)


def test_429_falls_back_to_the_message_delay() -> None:
    for text, seconds in [
        ("Please try again in 174ms.", 0.174),
        ("Please try again in 1.2s.", 1.2),
        ("Please try again in 6m0s.", 360.0),
        ("Please try again in 20 seconds.", 20.0),
    ]:
        failure = run(429, openai_error(f"Rate limit reached. {text}", None, "rate_limit_exceeded"))
        assert failure.cls is C.RATE_LIMITED
        assert failure.retry_after == pytest.approx(seconds), text


def test_429_without_any_hint_has_no_retry_after() -> None:
    failure = run(
        429, anthropic_error("rate_limit_error", "Number of requests has exceeded your rate limit.")
    )
    assert failure.cls is C.RATE_LIMITED
    assert failure.retry_after is None


def test_anthropic_429_with_retry_after_and_limits() -> None:
    headers = {
        "retry-after": "17",
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
        "request-id": "req_hdr",
    }
    body = anthropic_error(
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 30,000 input "
        "tokens per minute.",
    )
    failure = run(429, body, headers)
    assert failure.cls is C.RATE_LIMITED
    assert failure.retry_after == 17.0
    assert failure.limits is not None and failure.limits.input_tokens is not None
    assert failure.limits.input_tokens.remaining == 0
    assert failure.details["request_id"] == "req_011CZf8TJf84hAUziB6LuRoc"
    # Without retry-after, the input-tokens window the message names gives the wait.
    del headers["retry-after"]
    assert run(429, body, headers).retry_after == pytest.approx(59.0)


def test_gemini_per_minute_429_uses_retry_info() -> None:
    body = [
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota, please check your plan and billing "
                "details.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests",
                                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            }
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "19s"},
                ],
            }
        }
    ]
    failure = run(429, msgspec.json.encode(body))
    assert failure.cls is C.RATE_LIMITED
    assert failure.retry_after == 19.0
    assert failure.details["status"] == "RESOURCE_EXHAUSTED"


def test_request_larger_than_the_whole_window_is_oversized() -> None:
    body = openai_error(
        "Request too large for gpt-4.1 in organization org-abc on tokens per min (TPM): "
        "Limit 30000, Requested 30601. The input or output tokens must be reduced in order "
        "to run successfully.",
        "tokens",
        "rate_limit_exceeded",
    )
    failure = run(429, body)
    assert failure.cls is C.RATE_LIMITED
    assert failure.oversized


def test_long_context_429_is_its_own_class() -> None:
    body = anthropic_error("rate_limit_error", "Extra usage is required for long context requests.")
    failure = run(429, body, {"retry-after": "30"})
    assert failure.cls is C.LONG_CONTEXT_LIMITED
    assert failure.retry_after == 30.0
    assert failure.message == "Extra usage is required for long context requests."


# --- quota exhausted ------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_quota",
        "credit_balance_exhausted",
        "monthly_spend_limit_exceeded",
        "billing_hard_limit_reached",
    ],
)
def test_openai_out_of_money_codes(code: str) -> None:
    body = openai_error(
        "You exceeded your current quota, please check your plan and billing details.", code, code
    )
    failure = run(429, body, {"x-ratelimit-remaining-requests": "10"})
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.retry_after is None  # the router parks it for its long TTL


def test_anthropic_spend_cap() -> None:
    body = anthropic_error(
        "rate_limit_error",
        "Your workspace has reached its spend limit.",
        details={"error_code": "enforced_spend_limit_reached"},
    )
    failure = run(429, body)
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.details["error_code"] == "enforced_spend_limit_reached"


def test_anthropic_usage_limit_400_parks_until_the_date_it_names() -> None:
    body = anthropic_error(
        "invalid_request_error",
        "You have reached your specified API usage limits. You will regain access on "
        "2025-09-01 at 00:00 UTC.",
    )
    failure = run(400, body)
    assert failure.cls is C.QUOTA_EXHAUSTED
    regain = datetime(2025, 9, 1, tzinfo=UTC).timestamp()
    assert failure.retry_after == pytest.approx(regain - NOW)


def test_anthropic_low_credit_400_is_quota_not_bad_request() -> None:
    body = anthropic_error(
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits.",
    )
    assert run(400, body).cls is C.QUOTA_EXHAUSTED


def test_402_is_quota() -> None:
    body = msgspec.json.encode(
        {
            "error": {
                "code": 402,
                "message": "This request requires more credits.",
                "metadata": {"limit_source": "key"},
            }
        }
    )
    failure = run(402, body)
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.details["limit_source"] == "key"
    assert run(402, anthropic_error("billing_error", "Billing issue")).cls is C.QUOTA_EXHAUSTED


def test_openrouter_free_models_per_day_parks_until_its_reset() -> None:
    reset_ms = int((NOW + 3600) * 1000)
    body = msgspec.json.encode(
        {
            "error": {
                "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock "
                "1000 free model requests per day",
                "code": 429,
                "metadata": {
                    "headers": {
                        "X-RateLimit-Limit": "50",
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(reset_ms),
                    },
                    "provider_name": None,
                },
            },
            "user_id": "user_abc",
        }
    )
    failure = run(429, body)
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.retry_after == pytest.approx(3600.0)


def test_groq_tokens_per_day_is_quota_with_the_message_delay() -> None:
    body = openai_error(
        "Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01` "
        "service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 99719, "
        "Requested 1290. Please try again in 14m16.32s.",
        "tokens",
        "rate_limit_exceeded",
    )
    failure = run(429, body, requests_per_day=True)
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.retry_after == pytest.approx(856.32)


def test_gemini_per_day_quota_ignores_the_per_minute_retry_delay() -> None:
    body = [
        {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"},
                            {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"},
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "19s"},
                ],
            }
        }
    ]
    failure = run(429, msgspec.json.encode(body))
    assert failure.cls is C.QUOTA_EXHAUSTED
    assert failure.retry_after is None  # not 19 s: the day's quota is gone
    assert failure.details["retry_delay_s"] == 19.0
    assert "GenerateRequestsPerDayPerProjectPerModel-FreeTier" in failure.details["quota_ids"]


# --- auth, context, target, bad request -----------------------------------------------


def test_auth_failures() -> None:
    body = openai_error(
        "Incorrect API key provided: sk-proj-****abcd.", "invalid_request_error", "invalid_api_key"
    )
    assert run(401, body).cls is C.AUTH_FAILED
    assert (
        run(403, anthropic_error("permission_error", "Your API key does not have permission")).cls
        is C.AUTH_FAILED
    )
    gemini = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            ],
        }
    }
    assert run(400, gemini).cls is C.AUTH_FAILED


def test_moderation_403_does_not_disable_the_key() -> None:
    body = {
        "error": {
            "code": 403,
            "message": "Your chosen model requires moderation and your input was flagged",
        }
    }
    assert run(403, body).cls is C.BAD_REQUEST


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            400,
            openai_error(
                "This model's maximum context length is 4097 tokens. However, your messages "
                "resulted in 5000 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            ),
        ),
        (
            400,
            anthropic_error(
                "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"
            ),
        ),
        (
            413,
            anthropic_error(
                "request_too_large", "Request exceeds the maximum allowed number of bytes."
            ),
        ),
        (
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 32768 tokens and your request "
                "has 40000 input tokens.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
        ),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "The input token count (1200000) exceeds the maximum number of "
                    "tokens allowed (1048576).",
                    "status": "INVALID_ARGUMENT",
                }
            },
        ),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "Provider returned error",
                    "metadata": {
                        "raw": '{"error":{"message":"maximum context length is 131072 tokens"}}',
                        "provider_name": "DeepInfra",
                    },
                }
            },
        ),
    ],
)
def test_context_overflow(status: int, body: bytes | dict[str, Any]) -> None:
    failure = run(status, body)
    assert failure.cls is C.CONTEXT_OVERFLOW
    assert failure.retry_after is None


def test_openrouter_raw_provider_error_reaches_the_message() -> None:
    body = {
        "error": {
            "code": 400,
            "message": "Provider returned error",
            "metadata": {
                "raw": "maximum context length is 131072 tokens",
                "provider_name": "DeepInfra",
            },
        }
    }
    failure = run(400, body)
    assert "131072" in failure.message
    assert failure.details["provider"] == "DeepInfra"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            500,
            openai_error(
                "The server had an error while processing your request.", "server_error", None
            ),
        ),
        (
            503,
            openai_error(
                "The engine is currently overloaded, please try again later", "server_error", None
            ),
        ),
        (503, b"Slow Down"),
        (529, anthropic_error("overloaded_error", "Overloaded")),
        (504, anthropic_error("timeout_error", "Request timed out")),
        (
            503,
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded.",
                    "status": "UNAVAILABLE",
                }
            },
        ),
        (408, b""),
        (409, b"conflict"),
        (
            404,
            openai_error(
                "The model `gpt-9` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
        ),
        (404, anthropic_error("not_found_error", "model: claude-3-opus-20990101")),
        (404, {"error": {"code": 404, "message": "No endpoints found for meta-llama/llama-9."}}),
        (404, {"error": "model 'llama9' not found, try pulling it first"}),
    ],
)
def test_target_down(status: int, body: bytes | dict[str, Any]) -> None:
    assert run(status, body).cls is C.TARGET_DOWN


def test_target_down_keeps_a_retry_after_hint() -> None:
    assert run(503, b"busy", {"retry-after": "30"}).retry_after == 30.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            400,
            openai_error(
                "Invalid type for 'messages[0].content'", "invalid_request_error", "invalid_type"
            ),
        ),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}),
        (404, anthropic_error("not_found_error", "File not found: file_011CNha8iCJcU1wXNR6q4V8w")),
        (
            400,
            anthropic_error(
                "invalid_request_error", "The long context beta is not available for this model."
            ),
        ),
    ],
)
def test_bad_request(status: int, body: bytes | dict[str, Any]) -> None:
    assert run(status, body).cls is C.BAD_REQUEST


# --- errors inside accepted responses (mid-stream, HTTP 200) --------------------------


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        ({"error": {"code": 502, "message": "Provider disconnected unexpectedly"}}, C.TARGET_DOWN),
        ({"error": {"code": "server_error", "message": "Provider disconnected"}}, C.TARGET_DOWN),
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            C.TARGET_DOWN,
        ),
        ({"error": {"type": "invalid_request_error", "message": "Something odd"}}, C.TARGET_DOWN),
        ({"error": {"message": "upstream said no"}}, C.TARGET_DOWN),
        ({"error": {"code": 429, "message": "Rate limit exceeded"}}, C.RATE_LIMITED),
        ({"error": {"code": "insufficient_quota", "message": "quota"}}, C.QUOTA_EXHAUSTED),
        ({"error": {"code": "context_length_exceeded", "message": "too long"}}, C.CONTEXT_OVERFLOW),
    ],
)
def test_errors_after_the_request_was_accepted(body: dict[str, Any], cls: FailureClass) -> None:
    assert run(None, body).cls is cls
    assert run(200, body).cls is cls


# --- odd bodies, limits, messages -----------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        None,
        b"",
        b"{not json",
        b"[]",
        b"42",
        b'"just a string"',
        b"\xff\xfe\x00",
        b"null",
        "   ",
        {"error": None},
    ],
)
def test_junk_bodies_classify_by_status_without_raising(
    body: bytes | str | dict[str, Any] | None,
) -> None:
    assert run(503, body).cls is C.TARGET_DOWN
    assert run(429, body).cls is C.RATE_LIMITED
    assert run(418, body).cls is C.BAD_REQUEST
    assert run(None, body).cls is C.TARGET_DOWN


def test_html_error_page_is_named_by_its_title() -> None:
    page = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000
    failure = run(502, page)
    assert failure.cls is C.TARGET_DOWN
    assert failure.message == "502 Bad Gateway"


def test_empty_body_message_names_the_status() -> None:
    assert run(500, b"").message == "HTTP 500"


def test_long_messages_are_truncated() -> None:
    failure = run(400, openai_error("x" * 5000, "invalid_request_error", None))
    assert len(failure.message) <= MESSAGE_LIMIT
    assert failure.message.endswith("…")


def test_limits_attached_only_when_headers_had_some() -> None:
    failure = run(429, OPENAI_TPM, RATE_HEADERS, requests_per_day=True)
    assert failure.limits is not None
    assert failure.limits.tokens is not None and failure.limits.tokens.remaining == 0
    assert failure.limits.requests_per_day
    assert run(429, OPENAI_TPM).limits is None


def test_plain_dict_headers_work() -> None:
    failure = classify(429, {"retry-after": "2"}, OPENAI_TPM, key=KEY, now=NOW)
    assert failure.retry_after == 2.0
    assert classify(503, None, None, key=KEY, now=NOW).cls is C.TARGET_DOWN


# --- the key never leaks --------------------------------------------------------------


def assert_no_key(text: str, key: str = KEY) -> None:
    core = key.strip()
    assert core not in text
    for i in range(len(core) - 11):
        assert core[i : i + 12] not in text, core[i : i + 12]


def test_canary_key_echoed_everywhere_never_leaves() -> None:
    body = {
        "error": {
            "message": f"Incorrect API key provided: {KEY}. Also {KEY[:20]} and {KEY[-15:]}.",
            "type": f"invalid_request_error {KEY}",
            "code": f"invalid_api_key:{KEY}",
            "param": KEY,
            "metadata": {"raw": f"Bearer {KEY}", "provider_name": KEY},
        },
        "request_id": KEY,
    }
    failure = run(401, body, {"x-request-id": KEY})
    assert failure.cls is C.AUTH_FAILED
    exc = UpstreamFailure(failure)
    for text in (failure.message, repr(failure.details), str(exc), repr(exc), repr(failure)):
        assert_no_key(text)
    assert "[redacted]" in failure.message


def test_canary_in_plain_text_and_escaped_forms() -> None:
    key_with_newline = KEY + "\n"  # read from a key file without stripping
    text = f"Illegal header value b'Bearer {key_with_newline!r}'"
    failure = classify(400, {}, text, key=key_with_newline, now=NOW)
    assert_no_key(failure.message, key_with_newline)


def test_scrub_keeps_unrelated_text_and_short_keys() -> None:
    assert scrub("nothing to see", KEY) == "nothing to see"
    assert scrub("key abc123 here", "abc123") == "key [redacted] here"
    assert scrub("", KEY) == ""
    assert scrub("anything", "") == "anything"


def test_transport_failure_is_target_down_and_scrubbed() -> None:
    failure = transport_failure("connect error", f"refused for {KEY}", key=KEY)
    assert failure.cls is C.TARGET_DOWN
    assert failure.message.startswith("connect error: ")
    assert_no_key(failure.message)
    assert failure.details == {"transport": "connect error"}

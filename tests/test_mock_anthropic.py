"""The mock provider's Anthropic dialect over loopback HTTP: what a client of "Anthropic" sees."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process
from routerd.mock.anthropic_headers import format_rfc3339

GOOD = "sk-ant-good-00000000001"
LIMITED = "sk-ant-limited-00000002"
ITPM = "sk-ant-itpm-00000000003"
REVOKED = "sk-ant-revoked-00000004"
BROKE = "sk-ant-broke-0000000005"
CAPPED = "sk-ant-capped-000000006"
LONG = "sk-ant-long-00000000007"
NO_LONG = "sk-ant-nolong-000000008"
WINDOW_S = 1.0

SPEC = MockSpec(
    keys={
        GOOD: KeySpec(label="good"),
        LIMITED: KeySpec(label="limited", rpm=2, tpm=5000, itpm=1000, otpm=4000, window_s=WINDOW_S),
        ITPM: KeySpec(label="itpm", itpm=100, window_s=WINDOW_S),
        REVOKED: KeySpec(label="revoked", kind="invalid"),
        BROKE: KeySpec(label="broke", kind="no_quota"),
        CAPPED: KeySpec(label="capped", kind="spend_limit"),
        LONG: KeySpec(label="long", rpm=10, long_context_rpm=1, window_s=WINDOW_S),
        NO_LONG: KeySpec(label="nolong", long_context=False),
    },
    models={
        "claude-mock": ModelSpec(),
        "claude-small": ModelSpec(context_window=50),
        "claude-long": ModelSpec(context_window=50, long_context_window=500),
        "claude-flaky": ModelSpec(),
    },
    latency_ms=2,
)

TOOLS = [{"name": "search", "input_schema": {"type": "object"}}]
LONG_BETA = {"anthropic-beta": "fine-grained-tool-streaming-2025-05-14,context-1m-2025-08-07"}
RATE_LIMIT_FAMILIES = ("requests", "tokens", "input-tokens", "output-tokens")

# 400 characters: 100 tokens, over claude-long's 50 but within its long window of 500.
LONG_PROMPT = "x" * 400


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with start_mock_process(SPEC) as process:
        yield process


@pytest.fixture(autouse=True)
def _fresh(mock: MockProcess) -> None:
    mock.reset()


@asynccontextmanager
async def client(mock: MockProcess, read_timeout: float = 5.0) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.url, timeout=read_timeout) as http:
        yield http


def body(content: Any, model: str = "claude-mock", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", **extra}


async def post(
    http: httpx.AsyncClient, key: str, request: dict[str, Any], **headers: str
) -> httpx.Response:
    return await http.post("/v1/messages", json=request, headers=auth(key, **headers))


async def events_of(
    http: httpx.AsyncClient, key: str, request: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of a stream, in order, after checking the 200."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    async with http.stream(
        "POST", "/v1/messages", json={**request, "stream": True}, headers=auth(key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    # The SSE event name and the payload's own type always agree.
    assert all(name == data["type"] for name, data in events)
    return events


def assert_error(response: httpx.Response, status: int, kind: str) -> str:
    """Check Anthropic's error envelope; the message."""
    assert response.status_code == status
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == kind
    assert payload["request_id"].startswith("req_")
    assert response.headers["request-id"] == payload["request_id"]
    message: str = payload["error"]["message"]
    return message


def parse_reset(value: str) -> datetime:
    """An anthropic-ratelimit-*-reset value; it must be RFC 3339 UTC in whole seconds."""
    assert value.endswith("Z")
    assert "." not in value
    return datetime.fromisoformat(value)


def test_rfc3339_resets_round_up_to_whole_seconds() -> None:
    assert format_rfc3339(1755780059.0) == "2025-08-21T12:40:59Z"
    assert format_rfc3339(1755780058.2) == "2025-08-21T12:40:59Z"
    assert format_rfc3339(1755780058.0000000001) == "2025-08-21T12:40:58Z"


async def test_success_has_anthropic_shape(mock: MockProcess) -> None:
    async with client(mock) as http:
        response = await post(http, GOOD, body("hello mock", system="be brief"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["request-id"].startswith("req_")
    message = response.json()
    assert message["id"].startswith("msg_")
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "claude-mock",
        "content": [{"type": "text", "text": "mock reply from claude-mock via good: hello mock"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        # ceil((8 system + 10 user characters) / 4); ceil(47 / 4).
        "usage": {"input_tokens": 5, "output_tokens": 12, "cache_read_input_tokens": 0},
    }
    # A key without limits gets no rate-limit headers.
    assert not [h for h in response.headers if h.startswith("anthropic-ratelimit-")]


async def test_content_blocks_count_toward_the_prompt(mock: MockProcess) -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "find cats", "cache_control": {}}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "two cats"},
                {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]
    request = {"model": "claude-mock", "max_tokens": 64, "messages": history}
    unknown_block = body([{"type": "hologram", "text": "hi"}])
    async with client(mock) as http:
        response = await post(http, GOOD, request)
        refused = await post(http, GOOD, unknown_block)
    assert response.status_code == 200
    # 9 + ("search" + "{}") 8 + 8 + 6 characters = 8 tokens, and one image at 1600.
    assert response.json()["usage"]["input_tokens"] == 1608
    assert response.json()["content"][0]["text"].endswith(": thanks")
    assert "hologram" in assert_error(refused, 400, "invalid_request_error")


async def test_stream_event_sequence_is_exact(mock: MockProcess) -> None:
    async with client(mock) as http:
        events = await events_of(http, GOOD, body("stream me"))
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_")
    assert (start["role"], start["model"], start["content"]) == ("assistant", "claude-mock", [])
    assert (start["stop_reason"], start["stop_sequence"]) == (None, None)
    assert start["usage"]["input_tokens"] == 3
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    text = "".join(d["delta"]["text"] for d in deltas)
    assert text == "mock reply from claude-mock via good: stream me"
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": math.ceil(len(text) / 4)},
    }
    assert events[-1][1] == {"type": "message_stop"}


async def test_unknown_event_type_only_on_request(mock: MockProcess) -> None:
    async with client(mock) as http:
        events = await events_of(http, GOOD, body("hi [[mock:unknown_event]]"))
    names = [name for name, _ in events]
    assert names[:4] == ["message_start", "content_block_start", "ping", "future_event"]
    assert names.count("future_event") == 1
    assert names[-1] == "message_stop"
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text.endswith(": hi")


async def test_tool_use_whole_and_streamed(mock: MockProcess) -> None:
    prompt = "find cats [[mock:tool=search]]"
    async with client(mock) as http:
        whole = await post(http, GOOD, body(prompt, tools=TOOLS))
        without_tools = await post(http, GOOD, body(prompt))
        events = await events_of(http, GOOD, body(prompt, tools=TOOLS))

    message = whole.json()
    assert message["stop_reason"] == "tool_use"
    text, tool_use = message["content"]
    assert text == {"type": "text", "text": "mock tool call from claude-mock via good: search"}
    assert tool_use["id"].startswith("toolu_")
    assert tool_use == {
        "type": "tool_use",
        "id": tool_use["id"],
        "name": "search",
        "input": {"q": "find cats"},
    }
    assert without_tools.json()["stop_reason"] == "end_turn"

    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    opening = events[8][1]
    assert opening["index"] == 1
    assert opening["content_block"]["type"] == "tool_use"
    assert opening["content_block"]["name"] == "search"
    assert opening["content_block"]["input"] == {}
    pieces = [d for n, d in events[9:12]]
    assert all(p["index"] == 1 and p["delta"]["type"] == "input_json_delta" for p in pieces)
    assert json.loads("".join(p["delta"]["partial_json"] for p in pieces)) == {"q": "find cats"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


async def test_stop_sequence_and_max_tokens_end_the_reply(mock: MockProcess) -> None:
    async with client(mock) as http:
        stopped = await post(http, GOOD, body("hi", stop_sequences=["nope", " via"]))
        capped = await post(http, GOOD, body("hi", max_tokens=3))
    message = stopped.json()
    assert message["content"] == [{"type": "text", "text": "mock reply from claude-mock"}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", " via")
    message = capped.json()
    assert message["content"][0]["text"] == "mock reply f"
    assert (message["stop_reason"], message["usage"]["output_tokens"]) == ("max_tokens", 3)


async def test_auth_and_version_errors(mock: MockProcess) -> None:
    async with client(mock) as http:
        missing = await http.post(
            "/v1/messages", json=body("x"), headers={"anthropic-version": "2023-06-01"}
        )
        revoked = await post(http, REVOKED, body("x"))
        unknown = await post(http, "sk-ant-never-issued", body("x"))
        versionless = await http.post("/v1/messages", json=body("x"), headers={"x-api-key": GOOD})
    assert assert_error(missing, 401, "authentication_error") == "x-api-key header is required"
    assert assert_error(revoked, 401, "authentication_error") == "invalid x-api-key"
    assert assert_error(unknown, 401, "authentication_error") == "invalid x-api-key"
    assert REVOKED not in revoked.text
    message = assert_error(versionless, 400, "invalid_request_error")
    assert message == "anthropic-version: header is required"
    calls = mock.stats()["calls"]
    assert calls["revoked"]["claude-mock"] == {"401": 1}
    assert calls["unknown"]["claude-mock"] == {"401": 2}
    assert calls["good"]["claude-mock"] == {"400": 1}


async def test_out_of_credit_and_spend_cap_have_no_retry_hint(mock: MockProcess) -> None:
    async with client(mock) as http:
        broke = await post(http, BROKE, body("x"))
        capped = await post(http, CAPPED, body("x"))
    message = assert_error(broke, 400, "invalid_request_error")
    assert message.startswith("Your credit balance is too low to access the Anthropic API.")
    assert "retry-after" not in broke.headers

    assert_error(capped, 429, "rate_limit_error")
    error = capped.json()["error"]
    assert error["details"] == {"error_code": "enforced_spend_limit_reached"}
    now = datetime.now(UTC)
    next_month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    assert f"regain access on {next_month[0]}-{next_month[1]:02d}-01" in error["message"]
    assert "retry-after" not in capped.headers


async def test_rate_limit_headers_and_requests_window(mock: MockProcess) -> None:
    async with client(mock) as http:
        first = await post(http, LIMITED, body("one", max_tokens=100))
        sent = time.time()
        second = await post(http, LIMITED, body("two", max_tokens=100))
        third = await post(http, LIMITED, body("three", max_tokens=100))
        assert [first.status_code, second.status_code] == [200, 200]
        headers = first.headers
        assert headers["anthropic-ratelimit-requests-limit"] == "2"
        assert headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert headers["anthropic-ratelimit-tokens-limit"] == "5000"
        assert headers["anthropic-ratelimit-tokens-remaining"] == "4899"  # 1 + 100 reserved
        assert headers["anthropic-ratelimit-input-tokens-remaining"] == "999"
        assert headers["anthropic-ratelimit-output-tokens-limit"] == "4000"
        assert headers["anthropic-ratelimit-output-tokens-remaining"] == "3900"
        assert second.headers["anthropic-ratelimit-requests-remaining"] == "0"
        for family in RATE_LIMIT_FAMILIES:
            reset = parse_reset(second.headers[f"anthropic-ratelimit-{family}-reset"])
            # Whole seconds rounded up: never before the window has actually emptied.
            assert sent + WINDOW_S - 0.1 <= reset.timestamp() <= sent + WINDOW_S + 1.1

        message = assert_error(third, 429, "rate_limit_error")
        assert message.startswith(
            "This request would exceed your organization's rate limit of 2 requests per minute"
        )
        retry_after = int(third.headers["retry-after"])
        assert 1 <= retry_after <= math.ceil(WINDOW_S)
        assert third.headers["anthropic-ratelimit-requests-remaining"] == "0"

        await anyio.sleep(retry_after)
        fourth = await post(http, LIMITED, body("four", max_tokens=100))
    assert fourth.status_code == 200
    assert mock.stats()["calls"]["limited"]["claude-mock"] == {"200": 3, "429": 1}


async def test_input_token_window_and_request_too_large(mock: MockProcess) -> None:
    async with client(mock) as http:
        first = await post(http, ITPM, body("x" * 300))  # 75 of 100 input tokens
        second = await post(http, ITPM, body("x" * 300))
        huge = await post(http, ITPM, body("x" * 600))
    assert first.status_code == 200
    # Without a combined tpm, tokens-* describe the most restrictive token window.
    assert first.headers["anthropic-ratelimit-tokens-remaining"] == "25"
    assert first.headers["anthropic-ratelimit-input-tokens-remaining"] == "25"
    assert "anthropic-ratelimit-requests-limit" not in first.headers
    message = assert_error(second, 429, "rate_limit_error")
    assert "rate limit of 100 input tokens per minute" in message
    assert int(second.headers["retry-after"]) >= 1
    assert "input tokens per minute" in assert_error(huge, 429, "rate_limit_error")
    # Waiting would not make it fit, so there is no retry hint.
    assert "retry-after" not in huge.headers


async def test_prompt_too_long_and_other_bad_requests(mock: MockProcess) -> None:
    async with client(mock) as http:
        small = await post(http, GOOD, body(LONG_PROMPT, model="claude-small"), **LONG_BETA)
        no_beta = await post(http, GOOD, body(LONG_PROMPT, model="claude-long"))
        beyond = await post(http, GOOD, body("x" * 4000, model="claude-long"), **LONG_BETA)
        asked = await post(http, GOOD, body("hi [[mock:fail=context]]"))
        no_max = await post(http, GOOD, {"model": "claude-mock", "messages": []})
        missing = await post(http, GOOD, body("hi", model="claude-nope"))
    # The beta is no help to a model without a long window.
    message = assert_error(small, 400, "invalid_request_error")
    assert message == "prompt is too long: 100 tokens > 50 maximum"
    message = assert_error(no_beta, 400, "invalid_request_error")
    assert message == "prompt is too long: 100 tokens > 50 maximum"
    message = assert_error(beyond, 400, "invalid_request_error")
    assert message == "prompt is too long: 1000 tokens > 500 maximum"
    message = assert_error(asked, 400, "invalid_request_error")
    assert message == "prompt is too long: 128001 tokens > 128000 maximum"
    message = assert_error(no_max, 400, "invalid_request_error")
    assert message == "max_tokens: Field required"
    assert assert_error(missing, 404, "not_found_error") == "model: claude-nope"


async def test_long_context_with_beta_is_served_and_counted_apart(mock: MockProcess) -> None:
    async with client(mock) as http:
        long = await post(http, LONG, body(LONG_PROMPT, model="claude-long"), **LONG_BETA)
        short = await post(http, LONG, body("short", model="claude-long"), **LONG_BETA)
    assert long.status_code == 200
    assert long.json()["usage"]["input_tokens"] == 100
    assert short.status_code == 200
    # Long calls count in the key's normal windows too.
    assert short.headers["anthropic-ratelimit-requests-remaining"] == "8"
    assert mock.stats()["calls"]["long"] == {
        "claude-long#long": {"200": 1},
        "claude-long": {"200": 1},
    }


async def test_key_without_long_context_refuses_only_long_requests(mock: MockProcess) -> None:
    async with client(mock) as http:
        long = await post(http, NO_LONG, body(LONG_PROMPT, model="claude-long"), **LONG_BETA)
        short = await post(http, NO_LONG, body("short", model="claude-long"), **LONG_BETA)
    message = assert_error(long, 429, "rate_limit_error")
    assert message == "Extra usage is required for long context requests."
    assert "retry-after" not in long.headers
    assert short.status_code == 200
    assert mock.stats()["calls"]["nolong"] == {
        "claude-long#long": {"429": 1},
        "claude-long": {"200": 1},
    }


async def test_full_long_window_refuses_long_requests_but_not_short(mock: MockProcess) -> None:
    request = body(LONG_PROMPT, model="claude-long")
    async with client(mock) as http:
        first = await post(http, LONG, request, **LONG_BETA)
        second = await post(http, LONG, request, **LONG_BETA)
        short = await post(http, LONG, body("short", model="claude-long"))
        assert first.status_code == 200
        message = assert_error(second, 429, "rate_limit_error")
        assert "rate limit for long context requests" in message
        retry_after = int(second.headers["retry-after"])
        assert 1 <= retry_after <= math.ceil(WINDOW_S)
        assert short.status_code == 200

        await anyio.sleep(retry_after)
        again = await post(http, LONG, request, **LONG_BETA)
    assert again.status_code == 200
    assert mock.stats()["calls"]["long"] == {
        "claude-long#long": {"200": 2, "429": 1},
        "claude-long": {"200": 1},
    }


async def test_overload_and_server_faults(mock: MockProcess) -> None:
    mock.set_model("claude-flaky", ModelSpec(fault="529"))
    try:
        async with client(mock) as http:
            down = await post(http, GOOD, body("hi", model="claude-flaky"))
            mock.set_model("claude-flaky", ModelSpec())
            up = await post(http, GOOD, body("hi", model="claude-flaky"))
            failed = await post(http, GOOD, body("hi [[mock:fail=500]]"))
            unavailable = await post(http, GOOD, body("hi [[mock:fail=503]]"))
    finally:
        mock.set_model("claude-flaky", ModelSpec())
    assert down.status_code == 529
    assert down.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert up.status_code == 200
    assert_error(failed, 500, "api_error")
    assert_error(unavailable, 503, "api_error")


async def test_midstream_error_event_arrives_after_200(mock: MockProcess) -> None:
    async with client(mock) as http:
        events = await events_of(http, GOOD, body("hi [[mock:fail=midstream]]"))
        whole = await post(http, GOOD, body("hi [[mock:fail=midstream]]"))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert_error(whole, 529, "overloaded_error")


async def test_broken_connections(mock: MockProcess) -> None:
    received: list[str] = []
    async with client(mock, read_timeout=0.5) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream(
                "POST",
                "/v1/messages",
                json=body("hi [[mock:fail=cut]]", stream=True),
                headers=auth(GOOD),
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        received.append(line.removeprefix("event: "))
        # A reset, not an orderly close: an orderly one would be RemoteProtocolError.
        with pytest.raises(httpx.ReadError):
            await post(http, GOOD, body("hi [[mock:fail=reset]]"))
        with pytest.raises(httpx.ReadTimeout):
            await post(http, GOOD, body("hi [[mock:fail=timeout]]"))
        after = await post(http, GOOD, body("hi"))
    assert received[-2:] == ["content_block_delta", "content_block_delta"]
    assert "message_stop" not in received
    assert after.status_code == 200
    assert mock.stats()["calls"]["good"]["claude-mock"] == {
        "200": 2,
        "reset": 1,
        "timeout": 1,
    }


async def test_stats_have_one_structure_for_both_dialects(mock: MockProcess) -> None:
    openai_request = {"model": "claude-mock", "messages": [{"role": "user", "content": "hi"}]}
    async with client(mock) as http:
        await post(http, GOOD, body("hi"))
        await post(http, GOOD, body("hi", model="claude-x"))
        await http.post(
            "/v1/chat/completions",
            json=openai_request,
            headers={"Authorization": f"Bearer {GOOD}"},
        )
    assert mock.stats() == {
        "calls": {"good": {"claude-mock": {"200": 2}, "claude-x": {"404": 1}}},
        "total": 3,
    }


def test_official_sdk_reads_the_mock(mock: MockProcess) -> None:
    anthropic = pytest.importorskip("anthropic")
    with anthropic.Anthropic(api_key=GOOD, base_url=mock.url, max_retries=0) as sdk:
        message = sdk.messages.create(
            model="claude-mock",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi sdk"}],
        )
        assert message.content[0].text == "mock reply from claude-mock via good: hi sdk"
        with sdk.messages.stream(
            model="claude-mock",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi [[mock:unknown_event]]"}],
        ) as stream:
            final = stream.get_final_message()
        assert final.content[0].text.endswith(": hi")
        assert final.stop_reason == "end_turn"
    with (
        anthropic.Anthropic(api_key=NO_LONG, base_url=mock.url, max_retries=0) as sdk,
        pytest.raises(anthropic.RateLimitError, match="long context"),
    ):
        sdk.messages.create(
            model="claude-long",
            max_tokens=64,
            messages=[{"role": "user", "content": LONG_PROMPT}],
            extra_headers=LONG_BETA,
        )

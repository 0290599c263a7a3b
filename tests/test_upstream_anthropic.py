"""The Anthropic Messages adapter against a real HTTP server on loopback (tests.loopback)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from routerd.core.calls import Call
from routerd.core.outcome import Failure, FailureClass, UpstreamFailure
from routerd.dispatch.attempt import merge_tool_calls
from routerd.upstream.anthropic import AnthropicAdapter
from routerd.upstream.registry import adapter_for
from tests.loopback import Handler, Loopback, answering, wait_until

KEY = "sk-ant-api03-canary-Hq7Lm2Np4Rs6Tu8Vw0Xy3Za5Bc7De9Fg1Hj3Kl5Mn7Pq9Rs1Tu3Vw5-AbCdEfGh"
NOW = datetime(2025, 8, 21, 12, 40, 0, tzinfo=UTC).timestamp()

LIMIT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:01Z",
    "anthropic-ratelimit-input-tokens-limit": "30000",
    "anthropic-ratelimit-input-tokens-remaining": "29000",
    "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-output-tokens-limit": "8000",
    "anthropic-ratelimit-output-tokens-remaining": "8000",
    "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:40:00Z",
    "request-id": "req_011CSHoEeqs5C35K2UUqR7Fy",
}


def make_call(**kw: Any) -> Call:
    args: dict[str, Any] = {
        "base_url": "http://api.anthropic.com",
        "model": "claude-sonnet-4-5",
        "key": KEY,
        "body": {
            "model": "client-alias",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "hi"},
            ],
        },
        "timeout": 30.0,
        "headers": {"anthropic-beta": "context-1m-2025-08-07"},
    }
    args.update(kw)
    return Call(**args)


# Every test here talks to its own server on loopback (the ``upstream`` fixture).
pytestmark = pytest.mark.usefixtures("upstream")


def adapter(handler: Handler) -> AnthropicAdapter:
    return AnthropicAdapter(answering(handler), clock=lambda: NOW)


def reply(
    status: int,
    body: Any,
    headers: dict[str, str] | None = None,
    seen: list[httpx.Request] | None = None,
) -> Handler:
    content = body if isinstance(body, bytes) else msgspec.json.encode(body)

    async def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, content=content, headers=headers)

    return handler


def error(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


def assert_no_key(failure: Failure, exc: BaseException) -> None:
    for text in (str(exc), repr(exc), repr(failure), repr(failure.details)):
        for i in range(len(KEY) - 11):
            assert KEY[i : i + 12] not in text


MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"location": "Oslo"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 31},
}


# --- complete ---------------------------------------------------------------------------


async def test_complete_sends_a_messages_request_and_answers_in_openai_shape() -> None:
    seen: list[httpx.Request] = []
    call = make_call()
    result = await adapter(reply(200, MESSAGE, LIMIT_HEADERS, seen)).complete(call)

    request = seen[0]
    assert str(request.url) == "http://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert msgspec.json.decode(request.content) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": "Be terse.",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }
    assert call.body["model"] == "client-alias"  # reused for the next target; untouched

    assert result.text == "I'll check."
    assert result.tool_calls == [
        {
            "id": "toolu_01",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Oslo"}'},
        }
    ]
    assert result.finish_reason == "tool_calls"
    assert result.usage == {
        "prompt_tokens": 125,
        "completion_tokens": 31,
        "total_tokens": 156,
        "cached_tokens": 100,
    }
    assert result.model == "claude-sonnet-4-5-20250929"
    assert result.limits.input_tokens is not None
    assert result.limits.input_tokens.remaining == 29000
    assert result.limits.input_tokens.reset_s == 59.0
    assert result.limits.requests is not None and result.limits.requests.limit == 50


@pytest.mark.parametrize(
    "base_url",
    ["http://api.anthropic.com", "http://api.anthropic.com/", "http://api.anthropic.com/v1/"],
)
async def test_v1_is_never_doubled(base_url: str) -> None:
    seen: list[httpx.Request] = []
    await adapter(reply(200, MESSAGE, seen=seen)).complete(make_call(base_url=base_url))
    assert str(seen[0].url) == "http://api.anthropic.com/v1/messages"


async def test_a_request_anthropic_cannot_express_is_a_bad_request_sent_nowhere() -> None:
    seen: list[httpx.Request] = []
    audio = {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}
    call = make_call(body={"messages": [{"role": "user", "content": [audio]}]})
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, MESSAGE, seen=seen)).complete(call)
    assert caught.value.failure.cls is FailureClass.BAD_REQUEST
    assert "audio" in caught.value.failure.message
    with pytest.raises(UpstreamFailure):
        async with adapter(reply(200, MESSAGE, seen=seen)).stream(call):
            pass
    assert seen == []


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (529, error("overloaded_error", "Overloaded"), FailureClass.TARGET_DOWN),
        (500, error("api_error", "Internal server error"), FailureClass.TARGET_DOWN),
        (
            400,
            error("invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"),
            FailureClass.CONTEXT_OVERFLOW,
        ),
        (
            429,
            error("rate_limit_error", "Extra usage is required for long context requests."),
            FailureClass.LONG_CONTEXT_LIMITED,
        ),
        (
            402,
            error("billing_error", "Your organization has an outstanding balance."),
            FailureClass.QUOTA_EXHAUSTED,
        ),
        (401, error("authentication_error", f"invalid x-api-key {KEY}"), FailureClass.AUTH_FAILED),
        (403, error("permission_error", "not allowed"), FailureClass.AUTH_FAILED),
        (
            400,
            error("invalid_request_error", "messages.1: tool_use ids must be unique"),
            FailureClass.BAD_REQUEST,
        ),
        (200, error("overloaded_error", "Overloaded"), FailureClass.TARGET_DOWN),
    ],
)
async def test_errors_are_classified_and_never_carry_the_key(
    status: int, body: dict[str, Any], cls: FailureClass
) -> None:
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(status, body)).complete(make_call())
    failure = caught.value.failure
    assert failure.cls is cls
    assert failure.message == body["error"]["message"].replace(KEY, "[redacted]")
    assert failure.details["request_id"] == "req_011CSHoEeqs5C35K2UUqR7Fy"
    assert_no_key(failure, caught.value)


async def test_429_gives_retry_after_and_the_limits() -> None:
    body = error(
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 30,000 input tokens "
        "per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
    )
    headers = {
        **LIMIT_HEADERS,
        "anthropic-ratelimit-input-tokens-remaining": "0",
        "retry-after": "17",
    }
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(429, body, headers)).complete(make_call())
    failure = caught.value.failure
    assert failure.cls is FailureClass.RATE_LIMITED
    assert failure.status == 429
    assert failure.retry_after == 17.0
    assert failure.limits is not None and failure.limits.input_tokens is not None
    assert failure.limits.input_tokens.remaining == 0
    assert failure.limits.input_tokens.reset_s == 59.0

    # Without retry-after, the reset of the window the message names is the hint.
    del headers["retry-after"]
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(429, body, headers)).complete(make_call())
    assert caught.value.failure.retry_after == 59.0


async def test_unreadable_or_foreign_replies_are_target_down() -> None:
    openai_shaped = {"choices": [{"message": {"content": "hi"}}]}
    for content in (b"<html>bad gateway</html>", msgspec.json.encode(openai_shaped)):
        with pytest.raises(UpstreamFailure) as caught:
            await adapter(reply(200, content)).complete(make_call())
        assert caught.value.failure.cls is FailureClass.TARGET_DOWN
        assert caught.value.failure.message.startswith("malformed reply")


async def test_transport_errors_are_target_down_without_the_key() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, MESSAGE)).complete(make_call(base_url=f"http://127.0.0.1:{port}"))
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("connect error")
    assert caught.value.__context__ is None
    assert_no_key(caught.value.failure, caught.value)


# --- stream -----------------------------------------------------------------------------

# Anthropic's documented "streaming request with tool use" response, event for event
# (long data lines are split only in this source; the bytes are the documented ones).
DOCS_EVENTS: tuple[tuple[str, str], ...] = (
    (
        "message_start",
        '{"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U"'
        ',"type":"message","role":"assistant","model":"claude-opus-4-6"'
        ',"stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2}'
        ',"content":[],"stop_reason":null}}',
    ),
    (
        "content_block_start",
        '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
    ),
    ("ping", '{"type": "ping"}'),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":","}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" let"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\'s"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" check"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" the"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" weather"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" for"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" San"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta"'
        ',"text":" Francisco"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":","}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" CA"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":":"}}',
    ),
    ("content_block_stop", '{"type":"content_block_stop","index":0}'),
    (
        "content_block_start",
        '{"type":"content_block_start","index":1,"content_block":{"type":"tool_use"'
        ',"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":""}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":"{\\"location\\":"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":" \\"San"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":" Francisc"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":"o,"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":" CA\\""}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":","}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":" \\"unit\\": \\"fah"}}',
    ),
    (
        "content_block_delta",
        '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta"'
        ',"partial_json":"renheit\\"}"}}',
    ),
    ("content_block_stop", '{"type":"content_block_stop","index":1}'),
    (
        "message_delta",
        '{"type":"message_delta","delta":{"stop_reason":"tool_use"'
        ',"stop_sequence":null},"usage":{"output_tokens":89}}',
    ),
    ("message_stop", '{"type":"message_stop"}'),
)
DOCS_STREAM = "".join(f"event: {name}\ndata: {data}\n\n" for name, data in DOCS_EVENTS).encode()
_CUT = DOCS_STREAM.index(
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1'
)
# Everything up to the tool block: the text has reached the client by then.
BEFORE_TOOL = DOCS_STREAM[:_CUT]
OVERLOADED = (
    b"event: error\n"
    b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)


class Body(httpx.AsyncByteStream):
    """A response body that records whether it was read to the end and closed."""

    def __init__(self, *parts: bytes, then: BaseException | None = None) -> None:
        self.parts = parts
        self.then = then
        self.exhausted = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        if self.then is not None:
            raise self.then
        self.exhausted = True

    async def aclose(self) -> None:
        self.closed = True


def streaming(
    body: Body,
    status: int = 200,
    headers: dict[str, str] | None = None,
    seen: list[httpx.Request] | None = None,
) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(
            status, stream=body, headers={"content-type": "text/event-stream", **(headers or {})}
        )

    return handler


async def test_stream_of_the_documented_events_yields_openai_deltas_and_summary() -> None:
    # Split at awkward places: mid-line and mid-JSON.
    body = Body(DOCS_STREAM[:77], DOCS_STREAM[77:1500], DOCS_STREAM[1500:])
    seen: list[httpx.Request] = []
    async with adapter(streaming(body, headers=LIMIT_HEADERS, seen=seen)).stream(
        make_call()
    ) as stream:
        assert stream.limits.requests is not None and stream.limits.requests.remaining == 49
        deltas = [delta async for delta in stream]

    assert "".join(d.text for d in deltas) == "Okay, let's check the weather for San Francisco, CA:"
    tool_deltas = [c for d in deltas for c in d.tool_calls or ()]
    assert tool_deltas[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(
        c == {"index": 0, "function": {"arguments": c["function"]["arguments"]}}
        for c in tool_deltas[1:]
    )
    merged = merge_tool_calls(tool_deltas)
    assert msgspec.json.decode(merged[0]["function"]["arguments"]) == {
        "location": "San Francisco, CA",
        "unit": "fahrenheit",
    }
    assert deltas[-1].finish_reason == "tool_calls"
    assert stream.finish_reason == "tool_calls"
    assert stream.usage == {"prompt_tokens": 472, "completion_tokens": 89, "total_tokens": 561}
    assert stream.model == "claude-opus-4-6"

    sent = msgspec.json.decode(seen[0].content)
    assert sent["stream"] is True
    assert seen[0].headers["accept"] == "text/event-stream"
    assert seen[0].headers["anthropic-beta"] == "context-1m-2025-08-07"
    # Read to the end, so the connection can go back to the pool.
    await wait_until(lambda: body.exhausted and body.closed)


async def test_a_streams_limits_are_read_when_its_settle_asks_and_dated_then() -> None:
    # The settle asks after the stream ended; an absolute reset is counted from then, so a
    # long stream does not push the window's reset later by its own length.
    now = [NOW]
    body = Body(DOCS_STREAM)
    streaming_adapter = AnthropicAdapter(
        answering(streaming(body, headers=LIMIT_HEADERS)), clock=lambda: now[0]
    )
    async with streaming_adapter.stream(make_call()) as stream:
        deltas = [delta async for delta in stream]
        now[0] = NOW + 20.0  # the stream took 20 s
        limits = stream.limits
    assert deltas and stream.finish_reason == "tool_calls"
    assert limits.input_tokens is not None and limits.input_tokens.reset_s == 39.0
    assert limits.requests is not None and limits.requests.remaining == 49
    assert stream.limits is limits  # read once


async def test_stream_with_crlf_line_ends_and_no_event_names() -> None:
    # The data's own "type" names the event when a proxy drops the event: lines.
    lines = [line for line in DOCS_STREAM.decode().split("\n") if not line.startswith("event:")]
    text = "\r\n".join(lines).encode()
    async with adapter(streaming(Body(text))).stream(make_call()) as stream:
        deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas).startswith("Okay, let's")
    assert stream.finish_reason == "tool_calls"


async def test_error_event_mid_stream_raises_target_down_after_the_first_deltas() -> None:
    body = Body(BEFORE_TOOL, OVERLOADED)
    got: list[str] = []
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert "".join(got) == "Okay, let's check the weather for San Francisco, CA:"
    failure = caught.value.failure
    assert failure.cls is FailureClass.TARGET_DOWN
    assert failure.message == "Overloaded"
    assert failure.status is None
    await wait_until(lambda: body.closed)


async def test_stream_closed_before_message_stop_is_a_cut() -> None:
    without_stop = DOCS_STREAM[: DOCS_STREAM.index(b"event: message_stop")]
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(Body(without_stop))).stream(make_call()) as stream:
            [d async for d in stream]
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("stream cut")
    assert stream.finish_reason == "tool_calls"  # the summary so far is still there


async def test_transport_error_mid_stream_is_a_cut() -> None:
    exc = ConnectionResetError()  # the server cuts the connection here
    got: list[str] = []
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(Body(BEFORE_TOOL, then=exc))).stream(make_call()) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert got
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("stream cut (protocol error)")
    assert caught.value.__context__ is None


async def test_malformed_event_is_target_down() -> None:
    body = Body(b"event: message_start\ndata: {not json\n\n")
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            [d async for d in stream]
    assert caught.value.failure.message.startswith("malformed stream event")


@pytest.mark.parametrize(
    ("status", "body", "headers", "cls"),
    [
        (529, error("overloaded_error", "Overloaded"), {}, FailureClass.TARGET_DOWN),
        (
            429,
            error("rate_limit_error", f"Number of requests has exceeded your rate limit ({KEY})"),
            {**LIMIT_HEADERS, "anthropic-ratelimit-requests-remaining": "0", "retry-after": "1"},
            FailureClass.RATE_LIMITED,
        ),
        (401, error("authentication_error", "invalid x-api-key"), {}, FailureClass.AUTH_FAILED),
    ],
)
async def test_stream_error_status_raises_on_enter(
    status: int, body: dict[str, Any], headers: dict[str, str], cls: FailureClass
) -> None:
    response = Body(msgspec.json.encode(body))
    entered = False
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(response, status=status, headers=headers)).stream(make_call()):
            entered = True
    assert not entered
    assert caught.value.failure.cls is cls
    await wait_until(lambda: response.closed)
    assert_no_key(caught.value.failure, caught.value)
    if cls is FailureClass.RATE_LIMITED:
        assert caught.value.failure.retry_after == 1.0
        limits = caught.value.failure.limits
        assert limits is not None and limits.requests is not None
        assert limits.requests.remaining == 0


async def test_stream_iterates_once() -> None:
    async with adapter(streaming(Body(DOCS_STREAM))).stream(make_call()) as stream:
        [d async for d in stream]
        with pytest.raises(RuntimeError):
            stream.__aiter__()


# --- the table --------------------------------------------------------------------------


async def test_adapter_for_anthropic(upstream: Loopback) -> None:
    assert upstream.session is not None
    built = adapter_for("anthropic", upstream.session)
    assert isinstance(built, AnthropicAdapter)
    assert built.kind == "anthropic"

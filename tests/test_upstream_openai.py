"""The OpenAI chat-completions adapter against a real HTTP server on loopback (tests.loopback)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import uvicorn

from routerd.core.calls import Call
from routerd.core.outcome import FailureClass, UpstreamFailure
from routerd.upstream.base import Adapter
from routerd.upstream.common import translate_http_error
from routerd.upstream.openai import OpenAIAdapter
from routerd.upstream.registry import adapter_for
from routerd.upstream.session import KEEPALIVE_S
from routerd.upstream.wire import (
    ConnectError,
    ConnectTimeout,
    InvalidURL,
    NetworkError,
    ProtocolError,
    ReadError,
    ReadTimeout,
)
from tests.loopback import Disconnect, Handler, Loopback, answering, serve, wait_until

KEY = "sk-proj-Q2x7LmN4pR8sT1vW3yZ5aB6cD9eF0gH2jK4lM7nP1qR3sT5uV8wX0yZ2"

LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29000",
    "x-ratelimit-reset-tokens": "2s",
}


def make_call(**kw: Any) -> Call:
    args: dict[str, Any] = {
        "base_url": "http://api.openai.com/v1/",
        "model": "gpt-4.1-mini",
        "key": KEY,
        "body": {"model": "client-alias", "messages": [{"role": "user", "content": "hi"}]},
        "timeout": 30.0,
        "headers": {"X-Title": "routerd"},
    }
    args.update(kw)
    return Call(**args)


# Every test here talks to its own server on loopback (the ``upstream`` fixture).
pytestmark = pytest.mark.usefixtures("upstream")


def adapter(handler: Handler, **kw: Any) -> OpenAIAdapter:
    return OpenAIAdapter(answering(handler), **kw)


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


def assert_no_key(text: str) -> None:
    for i in range(len(KEY) - 11):
        assert KEY[i : i + 12] not in text


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4.1-mini-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there", "refusal": None},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}


# --- complete ---------------------------------------------------------------------------


async def test_complete_sends_the_target_model_and_key_and_reads_the_reply() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=COMPLETION, headers=LIMIT_HEADERS)

    call = make_call(body={**make_call().body, "stream_options": {"include_usage": True}})
    result = await adapter(handler).complete(call)

    request = seen[0]
    assert str(request.url) == "http://api.openai.com/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["x-title"] == "routerd"
    sent = msgspec.json.decode(request.content)
    assert sent["model"] == "gpt-4.1-mini"
    assert sent["stream"] is False
    assert "stream_options" not in sent
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert call.body["model"] == "client-alias"  # the caller's body is reused; untouched

    assert result.text == "Hello there"
    assert result.finish_reason == "stop"
    assert result.model == "gpt-4.1-mini-2025-04-14"
    # The cached prompt tokens are kept out of the nested breakdown, the rest of it dropped.
    assert result.usage == {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "total_tokens": 11,
        "cached_tokens": 0,
    }
    assert result.tool_calls is None
    assert result.limits.tokens is not None and result.limits.tokens.remaining == 29000
    assert result.limits.requests is not None and result.limits.requests.reset_s == pytest.approx(
        0.12
    )


async def test_complete_returns_tool_calls_and_part_lists() -> None:
    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    body = {
        "model": "m",
        "choices": [
            {
                "message": {
                    "content": [{"type": "text", "text": "Checking"}, {"type": "image"}],
                    "tool_calls": [tool_call],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    result = await adapter(reply(200, body)).complete(make_call())
    assert result.tool_calls == [tool_call]
    assert result.text == "Checking"
    assert result.finish_reason == "tool_calls"
    assert result.usage == {}


async def test_groq_request_window_is_daily() -> None:
    call = make_call(base_url="http://api.groq.com/openai/v1")
    result = await adapter(reply(200, COMPLETION, LIMIT_HEADERS)).complete(call)
    assert result.limits.requests_per_day
    result = await adapter(reply(200, COMPLETION, LIMIT_HEADERS)).complete(make_call())
    assert not result.limits.requests_per_day


async def test_complete_429_is_classified_with_retry_after_and_limits() -> None:
    body = {
        "error": {
            "message": "Rate limit reached for gpt-4.1-mini on tokens per min (TPM): Limit 30000, "
            "Used 30000, Requested 900. Please try again in 1.8s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    headers = {**LIMIT_HEADERS, "x-ratelimit-remaining-tokens": "0", "retry-after-ms": "1800"}
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(429, body, headers)).complete(make_call())
    failure = caught.value.failure
    assert failure.cls is FailureClass.RATE_LIMITED
    assert failure.status == 429
    assert failure.retry_after == pytest.approx(1.8)
    assert failure.limits is not None and failure.limits.tokens is not None
    assert failure.limits.tokens.remaining == 0


async def test_complete_401_is_auth_failed_and_the_echoed_key_is_scrubbed() -> None:
    body = {
        "error": {
            "message": f"Incorrect API key provided: {KEY}.",
            "type": "invalid_request_error",
            "param": KEY,
            "code": "invalid_api_key",
        }
    }
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(401, body)).complete(make_call())
    failure = caught.value.failure
    assert failure.cls is FailureClass.AUTH_FAILED
    for text in (str(caught.value), repr(caught.value), failure.message, repr(failure.details)):
        assert_no_key(text)


async def test_complete_200_with_error_body_is_not_a_reply() -> None:
    body = {"error": {"code": 502, "message": "Provider returned error"}}
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, body)).complete(make_call())
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN


async def test_complete_unreadable_reply_is_target_down() -> None:
    for content in (b"<html>oops</html>", b'{"choices": "nope"}'):
        with pytest.raises(UpstreamFailure) as caught:
            await adapter(reply(200, content)).complete(make_call())
        assert caught.value.failure.cls is FailureClass.TARGET_DOWN
        assert caught.value.failure.message.startswith("malformed reply")


async def test_each_client_error_is_target_down_named_by_its_kind() -> None:
    cases: list[tuple[Exception, str]] = [
        (ConnectTimeout("x"), "connect timeout after 5s"),
        (ConnectError("refused"), "connect error: refused"),
        (ReadTimeout("idle"), "read timeout after 30s"),
        (ProtocolError("server disconnected"), "protocol error"),
        (ProtocolError("cut short"), "protocol error: cut short"),
        (ReadError("[Errno 110] timed out"), "read error: [Errno 110] timed out"),
        (NetworkError("gone"), "network error: gone"),
        (InvalidURL("http://[::1"), "invalid url"),
        (TimeoutError(), "timeout after 30s"),
    ]
    for exc, expected in cases:
        failure = translate_http_error(exc, make_call())
        assert failure.cls is FailureClass.TARGET_DOWN
        assert failure.message.startswith(expected), (exc, failure.message)


async def test_connecting_is_bounded_by_the_providers_connect_timeout() -> None:
    # A listener whose backlog is full: the kernel drops further SYNs, so connecting hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            call = make_call(
                base_url=f"http://127.0.0.1:{port}/v1", timeout=30.0, connect_timeout=0.3
            )
            started = time.monotonic()
            with pytest.raises(UpstreamFailure) as caught:
                await adapter(reply(200, COMPLETION)).complete(call)
            waited = time.monotonic() - started
    assert caught.value.failure.message.startswith("connect timeout after 0.3s")
    assert 0.25 <= waited < 5.0
    # Never longer than the read timeout, and 5 s when the provider does not say.
    assert make_call(timeout=2.0, connect_timeout=10.0).connect_s == 2.0
    assert make_call().connect_s == 5.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_connection_is_a_connect_error() -> None:
    call = make_call(base_url=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, COMPLETION)).complete(call)
    failure = caught.value.failure
    assert failure.cls is FailureClass.TARGET_DOWN
    assert failure.message.startswith("connect error")
    assert caught.value.__context__ is None and caught.value.__cause__ is None


async def test_a_server_that_drops_the_connection_is_a_protocol_error() -> None:
    async def drop(request: httpx.Request) -> httpx.Response:
        raise Disconnect

    with pytest.raises(UpstreamFailure) as caught:
        await adapter(drop).complete(make_call())
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("protocol error")
    assert caught.value.__context__ is None


async def test_a_reply_slower_than_the_read_timeout_is_a_read_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(5)
        return httpx.Response(200, json=COMPLETION)

    with pytest.raises(UpstreamFailure) as caught:
        await adapter(slow).complete(make_call(timeout=0.3))
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("read timeout after 0.3s")


async def test_idle_connections_retire_before_common_servers_close_them() -> None:
    # uvicorn (the mock provider's server) closes an idle keep-alive connection after 5 s;
    # reusing one at that moment races the close and fails the call.
    assert uvicorn.Config(app="routerd.mock.app:MockApp").timeout_keep_alive > KEEPALIVE_S


async def test_a_connection_idle_past_the_keepalive_is_not_reused() -> None:
    async for loopback in serve(server_keepalive_s=1.0, client_keepalive_s=0.3):
        assert loopback.session is not None
        openai = OpenAIAdapter(loopback.session)
        loopback.handler = reply(200, COMPLETION)
        await openai.complete(make_call())
        await openai.complete(make_call())  # at once: the same connection
        await anyio.sleep(0.6)  # idle past the session's keep-alive, not the server's
        await openai.complete(make_call())
        first, again, after_idle = loopback.peers
        assert first == again and after_idle != first


async def test_a_redirect_is_not_followed() -> None:
    # Following a 307 would send the key to wherever the Location points.
    async def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"location": "http://elsewhere.example/v1"})

    with pytest.raises(UpstreamFailure) as caught:
        await adapter(moved).complete(make_call())
    assert caught.value.failure.status == 307


async def test_a_key_with_a_line_break_is_refused_before_sending_and_never_named() -> None:
    # A key file that kept its trailing newline: the header would be malformed.
    seen: list[httpx.Request] = []
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, COMPLETION, seen=seen)).complete(make_call(key=KEY + "\n"))
    assert seen == []
    assert caught.value.failure.message.startswith("local protocol error")
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    assert_no_key(str(caught.value))
    assert_no_key(repr(caught.value.failure))


async def test_invalid_base_url_is_target_down() -> None:
    with pytest.raises(UpstreamFailure) as caught:
        await adapter(reply(200, COMPLETION)).complete(make_call(base_url="http://[::1"))
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN


# --- stream -----------------------------------------------------------------------------


def sse(*events: str) -> bytes:
    return "".join(events).encode()


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4.1-mini-2025",
        "choices": choices,
        **extra,
    }
    return f"data: {msgspec.json.encode(body).decode()}\n\n"


TOOL_DELTA = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "f", "arguments": ""},
}
GOOD_STREAM = sse(
    ": OPENROUTER PROCESSING\n\n",
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    ": keep-alive\n",
    chunk({"content": "lo"}),
    chunk({"tool_calls": [TOOL_DELTA]}),
    chunk({}, "stop"),
    chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
    "data: [DONE]\n\n",
)


class Body(httpx.AsyncByteStream):
    """A response body that records whether it was read to the end and closed."""

    def __init__(
        self, *parts: bytes, then: BaseException | None = None, hang: bool = False
    ) -> None:
        self.parts = parts
        self.then = then
        self.hang = hang
        self.exhausted = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        if self.hang:
            await anyio.sleep_forever()
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


async def test_stream_yields_deltas_and_summary() -> None:
    body = Body(GOOD_STREAM[:50], GOOD_STREAM[50:333], GOOD_STREAM[333:])  # split mid-line
    seen: list[httpx.Request] = []
    async with adapter(streaming(body, headers=LIMIT_HEADERS, seen=seen)).stream(
        make_call()
    ) as stream:
        assert stream.limits.tokens is not None and stream.limits.tokens.limit == 30000
        deltas = [delta async for delta in stream]
    assert "".join(d.text for d in deltas) == "Hello"
    assert [d.tool_calls for d in deltas if d.tool_calls] == [[TOOL_DELTA]]
    assert deltas[-1].finish_reason == "stop"
    assert stream.finish_reason == "stop"
    assert stream.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert stream.model == "gpt-4.1-mini-2025"
    sent = msgspec.json.decode(seen[0].content)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert seen[0].headers["accept"] == "text/event-stream"
    # Read to the end, so the connection can go back to the pool.
    await wait_until(lambda: body.exhausted and body.closed)


async def test_stream_handles_crlf_and_trailing_done_without_blank_line() -> None:
    text = GOOD_STREAM.decode().replace("\n", "\r\n").removesuffix("\r\n\r\n")
    async with adapter(streaming(Body(text.encode()))).stream(make_call()) as stream:
        deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas) == "Hello"


async def test_stream_usage_can_be_turned_off() -> None:
    seen: list[httpx.Request] = []
    handler = streaming(Body(GOOD_STREAM), seen=seen)
    async with adapter(handler, stream_usage=False).stream(make_call()) as stream:
        [d async for d in stream]
    assert "stream_options" not in msgspec.json.decode(seen[0].content)


async def test_stream_error_status_raises_on_enter() -> None:
    body = Body(
        msgspec.json.encode(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
    )
    entered = False
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body, status=529, headers={"retry-after": "3"})).stream(
            make_call()
        ):
            entered = True
    assert not entered
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.retry_after == 3.0
    assert caught.value.failure.message == "Overloaded"
    await wait_until(lambda: body.closed)


async def test_stream_429_on_enter_echoing_the_key_is_scrubbed() -> None:
    body = Body(
        msgspec.json.encode(
            {"error": {"message": f"key {KEY} is rate limited", "code": "rate_limit_exceeded"}}
        )
    )
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body, status=429)).stream(make_call()):
            pass
    assert caught.value.failure.cls is FailureClass.RATE_LIMITED
    assert_no_key(str(caught.value))


async def test_mid_stream_error_chunk_raises_after_the_first_delta() -> None:
    error = {"error": {"code": "server_error", "message": "Provider disconnected unexpectedly"}}
    body = Body(sse(chunk({"content": "Hi"}), chunk({"content": ""}, "error", **error)))
    got: list[str] = []
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert got == ["Hi"]
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message == "Provider disconnected unexpectedly"
    await wait_until(lambda: body.closed)


async def test_mid_stream_rate_limit_error_keeps_its_class() -> None:
    body = Body(
        sse(
            ": OPENROUTER PROCESSING\n\n",
            'data: {"error": {"code": 429, "message": "Rate limit exceeded"}}\n\n',
        )
    )
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            [d async for d in stream]
    assert caught.value.failure.cls is FailureClass.RATE_LIMITED


async def test_stream_closed_before_done_is_a_cut() -> None:
    body = Body(sse(chunk({"content": "Hel"})))
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            [d async for d in stream]
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert "stream cut" in caught.value.failure.message


async def test_finished_stream_without_done_is_accepted() -> None:
    body = Body(sse(chunk({"content": "ok"}), chunk({}, "stop")))
    async with adapter(streaming(body)).stream(make_call()) as stream:
        deltas = [d async for d in stream]
    assert [d.text for d in deltas] == ["ok", ""]
    assert stream.finish_reason == "stop"


async def test_a_connection_cut_mid_stream_is_a_cut() -> None:
    body = Body(sse(chunk({"content": "Hel"})), then=ConnectionResetError())
    got: list[str] = []
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert got == ["Hel"]
    assert caught.value.failure.cls is FailureClass.TARGET_DOWN
    assert caught.value.failure.message.startswith("stream cut (protocol error)")
    assert caught.value.__context__ is None


async def test_a_stream_that_goes_quiet_is_cut_at_the_read_timeout() -> None:
    body = Body(sse(chunk({"content": "Hel"})), hang=True)
    got: list[str] = []
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call(timeout=0.3)) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert got == ["Hel"]
    assert caught.value.failure.message.startswith("stream cut (read timeout after 0.3s)")
    await wait_until(lambda: body.closed)


async def test_a_line_longer_than_any_buffer_arrives_whole() -> None:
    text = "x" * 300_000  # one SSE line of 300 kB, in pieces
    line = chunk({"content": text}).encode()
    parts = [line[i : i + 7000] for i in range(0, len(line), 7000)]
    body = Body(*parts, chunk({}, "stop").encode(), b"data: [DONE]\n\n")
    async with adapter(streaming(body)).stream(make_call()) as stream:
        deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas) == text


async def test_a_stream_read_to_its_end_leaves_its_connection_for_the_next_call(
    upstream: Loopback,
) -> None:
    for _ in range(2):
        async with adapter(streaming(Body(GOOD_STREAM))).stream(make_call()) as stream:
            [d async for d in stream]
    assert len(upstream.peers) == 2 and upstream.peers[0] == upstream.peers[1]


async def test_malformed_chunk_is_target_down() -> None:
    body = Body(sse('data: {"choices": 7}\n\n'))
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            [d async for d in stream]
    assert caught.value.failure.message.startswith("malformed stream chunk")


async def test_connect_failure_on_enter_is_target_down() -> None:
    call = make_call(base_url=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(UpstreamFailure) as caught:
        async with adapter(streaming(Body(GOOD_STREAM))).stream(call):
            pass
    assert caught.value.failure.message.startswith("connect error")
    assert caught.value.__context__ is None


async def test_cancelling_a_stream_closes_the_response() -> None:
    body = Body(sse(chunk({"content": "Hel"})), hang=True)
    got: list[str] = []
    with anyio.move_on_after(0.2) as scope:
        async with adapter(streaming(body)).stream(make_call()) as stream:
            async for delta in stream:
                got.append(delta.text)
    assert scope.cancelled_caught
    assert got == ["Hel"]
    # The connection was closed: the server's side of it ends the body.
    await wait_until(lambda: body.closed)


async def test_stream_iterates_once() -> None:
    async with adapter(streaming(Body(GOOD_STREAM))).stream(make_call()) as stream:
        [d async for d in stream]
        with pytest.raises(RuntimeError):
            stream.__aiter__()


# --- the table --------------------------------------------------------------------------


async def test_adapter_for_kinds(upstream: Loopback) -> None:
    http = upstream.session
    assert http is not None
    openai: Adapter = adapter_for("openai", http)
    compatible = adapter_for("openai-compatible", http)
    assert isinstance(openai, OpenAIAdapter) and openai.kind == "openai"
    assert isinstance(compatible, OpenAIAdapter) and compatible.kind == "openai-compatible"
    assert adapter_for("anthropic", http).kind == "anthropic"
    with pytest.raises(ValueError, match="unknown upstream kind 'grpc'"):
        adapter_for("grpc", http)

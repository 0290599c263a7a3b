"""The mock provider over real loopback HTTP: what a client of "OpenAI" would observe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import routerd
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process
from routerd.mock.limits import SlidingWindow, format_go_duration

GOOD = "sk-test-good-000000001"
RPM = "sk-test-rpm-0000000002"
TPM = "sk-test-tpm-0000000003"
REVOKED = "sk-test-revoked-000004"
BROKE = "sk-test-broke-0000005"
WINDOW_S = 1.5

SPEC = MockSpec(
    keys={
        GOOD: KeySpec(label="good"),
        RPM: KeySpec(label="rpm", rpm=2, window_s=WINDOW_S),
        TPM: KeySpec(label="tpm", tpm=200, window_s=WINDOW_S),
        REVOKED: KeySpec(label="revoked", kind="invalid"),
        BROKE: KeySpec(label="broke", kind="no_quota"),
    },
    models={
        "gpt-mock": ModelSpec(),
        "gpt-small": ModelSpec(context_window=50),
        "gpt-flaky": ModelSpec(),
    },
    latency_ms=2,
)

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with start_mock_process(SPEC) as process:
        yield process


@pytest.fixture(autouse=True)
def _fresh(mock: MockProcess) -> None:
    mock.reset()


@asynccontextmanager
async def client(mock: MockProcess, read_timeout: float = 5.0) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.base_url, timeout=read_timeout) as http:
        yield http


def chat(content: str, model: str = "gpt-mock", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def sse_payloads(response: httpx.Response) -> list[str]:
    """The data: payloads of a stream, in order."""
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


# Pure pieces first: no process needed.


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.0001, "1ms"),
        (1, "1s"),
        (1.234, "1.234s"),
        (1.2, "1.2s"),
        (360, "6m0s"),
        (179.56, "2m59.56s"),
        (3600, "1h0m0s"),
    ],
)
def test_go_duration_matches_openai_reset_headers(seconds: float, expected: str) -> None:
    assert format_go_duration(seconds) == expected


def test_sliding_window_frees_capacity_as_entries_age_out() -> None:
    window = SlidingWindow(limit=3, length=10.0)
    window.add(1, now=0.0)
    window.add(2, now=4.0)
    assert window.wait_for(1, now=5.0) == 5.0  # the first entry leaves at t=10
    assert window.wait_for(3, now=5.0) == 9.0  # needs both gone: t=14
    assert window.wait_for(4, now=5.0) == float("inf")
    state = window.state(now=5.0)
    assert (state.remaining, state.reset_s) == (0, 9.0)
    assert window.wait_for(1, now=10.0) == 0.0
    assert window.state(now=14.0).reset_s == 0.0


# The process over loopback.


async def test_success_has_openai_shape(mock: MockProcess) -> None:
    async with client(mock) as http:
        response = await http.post("/chat/completions", json=chat("hello mock"), headers=auth(GOOD))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-mock"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "mock reply from gpt-mock via good: hello mock",
    }
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 3  # ceil(10 chars / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # A key without limits gets no rate-limit headers.
    assert "x-ratelimit-limit-requests" not in response.headers


async def test_stream_has_openai_sse_shape(mock: MockProcess) -> None:
    request = chat("stream me", stream=True, stream_options={"include_usage": True})
    async with (
        client(mock) as http,
        http.stream("POST", "/chat/completions", json=request, headers=auth(GOOD)) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = await sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(content) >= 3
    assert "".join(content) == "mock reply from gpt-mock via good: stream me"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 3


async def test_stream_without_include_usage_has_no_usage_chunk(mock: MockProcess) -> None:
    async with (
        client(mock) as http,
        http.stream(
            "POST", "/chat/completions", json=chat("hi", stream=True), headers=auth(GOOD)
        ) as response,
    ):
        payloads = await sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    assert all("usage" not in json.loads(p) for p in payloads[:-1])


async def test_rpm_window_rejects_then_recovers(mock: MockProcess) -> None:
    async with client(mock) as http:
        first = await http.post("/chat/completions", json=chat("one"), headers=auth(RPM))
        second = await http.post("/chat/completions", json=chat("two"), headers=auth(RPM))
        third = await http.post("/chat/completions", json=chat("three"), headers=auth(RPM))
        assert [first.status_code, second.status_code] == [200, 200]
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert second.headers["x-ratelimit-reset-requests"] == "1.5s"
        assert "x-ratelimit-limit-tokens" not in second.headers

        assert third.status_code == 429
        error = third.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "Limit 2, Used 2, Requested 1. Please try again in" in error["message"]
        retry_ms = float(third.headers["retry-after-ms"])
        assert 0 < retry_ms <= WINDOW_S * 1000
        assert int(third.headers["retry-after"]) >= retry_ms / 1000
        assert third.headers["x-ratelimit-remaining-requests"] == "0"

        await anyio.sleep(retry_ms / 1000 + 0.05)
        fourth = await http.post("/chat/completions", json=chat("four"), headers=auth(RPM))
    assert fourth.status_code == 200
    assert mock.stats()["calls"]["rpm"]["gpt-mock"] == {"200": 3, "429": 1}


async def test_tpm_window_and_request_too_large(mock: MockProcess) -> None:
    async with client(mock) as http:
        # ceil(6 chars / 4) = 2 prompt tokens + 150 max_tokens = 152 of 200.
        first = await http.post(
            "/chat/completions", json=chat("tokens", max_tokens=150), headers=auth(TPM)
        )
        second = await http.post(
            "/chat/completions", json=chat("tokens", max_tokens=150), headers=auth(TPM)
        )
        huge = await http.post(
            "/chat/completions", json=chat("tokens", max_tokens=500), headers=auth(TPM)
        )
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "48"
    assert "x-ratelimit-limit-requests" not in first.headers
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    assert "Limit 200, Used 152, Requested 152" in second.json()["error"]["message"]
    assert "retry-after-ms" in second.headers
    assert huge.status_code == 429
    assert "Request too large for gpt-mock" in huge.json()["error"]["message"]
    assert "Limit 200, Requested 502" in huge.json()["error"]["message"]
    # Waiting would not help, so there is no retry hint.
    assert "retry-after" not in huge.headers


async def test_invalid_key_is_401_and_masked(mock: MockProcess) -> None:
    async with client(mock) as http:
        revoked = await http.post("/chat/completions", json=chat("x"), headers=auth(REVOKED))
        unknown = await http.post(
            "/chat/completions", json=chat("x"), headers=auth("sk-never-issued-xyz")
        )
    assert revoked.status_code == unknown.status_code == 401
    error = revoked.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert REVOKED not in revoked.text
    assert "sk-te" + "*" * (len(REVOKED) - 7) + "04" in error["message"]
    assert "sk-never-issued-xyz" not in unknown.text
    assert "x-ratelimit-limit-requests" not in revoked.headers
    calls = mock.stats()["calls"]
    assert calls["revoked"]["gpt-mock"] == {"401": 1}
    assert calls["unknown"]["gpt-mock"] == {"401": 1}


async def test_no_quota_is_429_without_retry_hint(mock: MockProcess) -> None:
    async with client(mock) as http:
        response = await http.post("/chat/completions", json=chat("x"), headers=auth(BROKE))
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "retry-after" not in response.headers
    assert "retry-after-ms" not in response.headers


async def test_context_overflow_and_unknown_model(mock: MockProcess) -> None:
    async with client(mock) as http:
        long = await http.post(
            "/chat/completions", json=chat("x" * 400, model="gpt-small"), headers=auth(GOOD)
        )
        asked = await http.post(
            "/chat/completions", json=chat("hi [[mock:fail=context]]"), headers=auth(GOOD)
        )
        missing = await http.post(
            "/chat/completions", json=chat("hi", model="gpt-nope"), headers=auth(GOOD)
        )
    assert long.status_code == 400
    error = long.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "maximum context length is 50 tokens" in error["message"]
    assert "resulted in 100 tokens" in error["message"]
    assert asked.json()["error"]["code"] == "context_length_exceeded"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert "`gpt-nope`" in missing.json()["error"]["message"]


async def test_outage_started_and_ended_with_set_model(mock: MockProcess) -> None:
    mock.set_model("gpt-flaky", ModelSpec(fault="503"))
    try:
        async with client(mock) as http:
            down = await http.post(
                "/chat/completions", json=chat("hi", model="gpt-flaky"), headers=auth(GOOD)
            )
            mock.set_model("gpt-flaky", ModelSpec())
            up = await http.post(
                "/chat/completions", json=chat("hi", model="gpt-flaky"), headers=auth(GOOD)
            )
    finally:
        mock.set_model("gpt-flaky", ModelSpec())
    assert down.status_code == 503
    assert down.json()["error"]["type"] == "server_error"
    assert "currently overloaded" in down.json()["error"]["message"]
    assert up.status_code == 200


async def test_midstream_error_arrives_after_200(mock: MockProcess) -> None:
    request = chat("hi [[mock:fail=midstream]]", stream=True)
    async with (
        client(mock) as http,
        http.stream("POST", "/chat/completions", json=request, headers=auth(GOOD)) as response,
    ):
        assert response.status_code == 200
        payloads = await sse_payloads(response)
    chunks = [json.loads(p) for p in payloads]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:3]] == [
        "",
        "mock reply",
        " from gpt-",
    ]
    assert chunks[-1] == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
        }
    }
    assert "[DONE]" not in payloads

    async with client(mock) as http:
        whole = await http.post(
            "/chat/completions", json=chat("hi [[mock:fail=midstream]]"), headers=auth(GOOD)
        )
    assert whole.status_code == 500


async def test_cut_stream_ends_without_done(mock: MockProcess) -> None:
    received: list[str] = []
    request = chat("hi [[mock:fail=cut]]", stream=True)
    async with client(mock) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream(
                "POST", "/chat/completions", json=request, headers=auth(GOOD)
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line[6:])
    assert len(received) == 3  # the role chunk and two content chunks
    assert "[DONE]" not in received


async def test_reset_drops_connection_without_response(mock: MockProcess) -> None:
    async with client(mock) as http:
        # A reset, not an orderly close: an orderly one would be RemoteProtocolError.
        with pytest.raises(httpx.ReadError):
            await http.post(
                "/chat/completions", json=chat("hi [[mock:fail=reset]]"), headers=auth(GOOD)
            )
        # The mock itself is unharmed.
        after = await http.post("/chat/completions", json=chat("hi"), headers=auth(GOOD))
    assert after.status_code == 200
    assert mock.stats()["calls"]["good"]["gpt-mock"] == {"reset": 1, "200": 1}


async def test_timeout_directive_outlasts_the_client(mock: MockProcess) -> None:
    started = time.monotonic()
    async with client(mock, read_timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/chat/completions", json=chat("hi [[mock:fail=timeout]]"), headers=auth(GOOD)
            )
        assert time.monotonic() - started < 3
        after = await http.post("/chat/completions", json=chat("hi"), headers=auth(GOOD))
    assert after.status_code == 200
    assert mock.stats()["calls"]["good"]["gpt-mock"]["timeout"] == 1


async def test_sleep_directive_delays_the_reply(mock: MockProcess) -> None:
    async with client(mock) as http:
        started = time.monotonic()
        response = await http.post(
            "/chat/completions", json=chat("hi [[mock:sleep=300]]"), headers=auth(GOOD)
        )
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3
    assert response.json()["choices"][0]["message"]["content"].endswith(": hi")


async def test_tool_call_whole_and_streamed(mock: MockProcess) -> None:
    prompt = "find cats [[mock:tool=search]]"
    async with client(mock) as http:
        whole = await http.post(
            "/chat/completions", json=chat(prompt, tools=TOOLS), headers=auth(GOOD)
        )
        without_tools = await http.post("/chat/completions", json=chat(prompt), headers=auth(GOOD))
        async with http.stream(
            "POST",
            "/chat/completions",
            json=chat(prompt, tools=TOOLS, stream=True),
            headers=auth(GOOD),
        ) as response:
            payloads = await sse_payloads(response)

    (choice,) = whole.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function"
    assert tool_call["id"].startswith("call_")
    assert tool_call["function"]["name"] == "search"
    assert json.loads(tool_call["function"]["arguments"]) == {"q": "find cats"}

    assert without_tools.json()["choices"][0]["finish_reason"] == "stop"

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
    pieces = [d[0] for d in deltas if d]
    assert pieces[0]["function"]["name"] == "search"
    assert pieces[0]["id"].startswith("call_")
    assert all(p["index"] == 0 for p in pieces)
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert json.loads(arguments) == {"q": "find cats"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_stats_count_every_chat_call(mock: MockProcess) -> None:
    async with client(mock) as http:
        for _ in range(2):
            await http.post("/chat/completions", json=chat("hi"), headers=auth(GOOD))
        await http.post("/chat/completions", json=chat("hi", model="gpt-x"), headers=auth(GOOD))
        await http.post("/chat/completions", json=chat("hi"), headers=auth("sk-who-is-this-1"))
        await http.get("/models", headers=auth(GOOD))  # not a chat call
    assert mock.stats() == {
        "calls": {
            "good": {"gpt-mock": {"200": 2}, "gpt-x": {"404": 1}},
            "unknown": {"gpt-mock": {"401": 1}},
        },
        "total": 4,
    }
    mock.reset()
    assert mock.stats() == {"calls": {}, "total": 0}


async def test_models_list(mock: MockProcess) -> None:
    async with client(mock) as http:
        listed = await http.get("/models", headers=auth(GOOD))
        refused = await http.get("/models", headers=auth("sk-never-issued-xyz"))
    assert listed.json()["object"] == "list"
    assert {m["id"] for m in listed.json()["data"]} == {"gpt-mock", "gpt-small", "gpt-flaky"}
    assert refused.status_code == 401


def test_refuses_non_loopback_host() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(routerd.__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "routerd.mock", "--spec", "-", "--host", "0.0.0.0"],
        input=b'{"keys": {}, "models": {}}',
        capture_output=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"not a loopback address" in result.stderr


def test_process_announces_real_port_and_stops_cleanly() -> None:
    with start_mock_process(MockSpec(keys={}, models={})) as process:
        assert process.base_url.startswith("http://127.0.0.1:")
        assert process.base_url.endswith("/v1")
        assert not process.base_url.startswith("http://127.0.0.1:0/")
        assert process.stats() == {"calls": {}, "total": 0}
    assert process.process.returncode == 0

"""Streams, fallbacks, tool calls, context overflow and deadlines, on the real daemon process.

Two providers (alpha, beta) on one mock provider, each with its own key, so the mock's call
counts tell which target served what.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from routerd_client import (
    AsyncClient,
    Chunk,
    Client,
    ContextOverflow,
    RateLimited,
    Result,
    TargetDown,
)

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up.",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
]


def start(
    mock_provider: MockFactory,
    daemon: DaemonFactory,
    models: dict[str, ModelSpec],
    routes: str,
    *,
    alpha: KeySpec | None = None,
    extra: str = "",
) -> tuple[MockProcess, DaemonProcess]:
    """A mock with keys "alpha" and "beta", and a daemon with providers a and b over it."""
    key_a, key_b = canary("alpha"), canary("beta")
    mock = mock_provider(
        MockSpec(keys={key_a: alpha or KeySpec("alpha"), key_b: KeySpec("beta")}, models=models)
    )
    config = f"""
[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "alpha", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "beta", key_env = "KEY_B" }}]
{routes}
{extra}
"""
    return mock, daemon(config, env={"KEY_A": key_a, "KEY_B": key_b})


CHAIN = """
[routes.main]
chain = ["a/m1", "b/m2"]
deadline_s = 30
"""


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def calls(mock: MockProcess, label: str) -> dict[str, dict[str, int]]:
    """{model: {status: count}} of one key."""
    stats: dict[str, dict[str, int]] = mock.stats()["calls"].get(label, {})
    return stats


def outcomes(result: Result | Exception) -> list[tuple[str, str, int | None]]:
    attempts = result.attempts if isinstance(result, Result) else getattr(result, "attempts", [])
    return [(a.target, a.outcome, a.status) for a in attempts]


async def test_stream_chunks_add_up_to_the_result(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    _, routerd = start(mock_provider, daemon, {"m1": ModelSpec(), "m2": ModelSpec()}, CHAIN)
    chunks: list[Chunk] = []
    async with AsyncClient(str(routerd.socket_path)) as client:
        stream = client.stream("main", user("tell me a story"), max_tokens=64)
        async for chunk in stream:
            chunks.append(chunk)
    result = stream.result

    assert result is not None
    assert result.text == "mock reply from m1 via alpha: tell me a story"
    assert "".join(c.text for c in chunks) == result.text
    assert len([c for c in chunks if c.text]) > 1  # it really came in pieces
    assert all(c.id == stream.id for c in chunks)
    assert result.finish_reason == "stop"
    assert (result.provider, result.target, result.credential) == ("a", "a/m1", "alpha")
    assert result.usage["prompt_tokens"] > 0 and result.usage["completion_tokens"] > 0
    assert result.usage["total_tokens"] == (
        result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    )
    assert outcomes(result) == [("a/m1", "ok", 200)]


def test_stream_falls_back_invisibly_before_the_first_byte(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock, routerd = start(
        mock_provider, daemon, {"m1": ModelSpec(fault="503"), "m2": ModelSpec()}, CHAIN
    )
    with Client(str(routerd.socket_path)) as client:
        stream = client.stream("main", user("are you there"))
        text = "".join(chunk.text for chunk in stream)
    result = stream.result

    assert result is not None
    assert (result.provider, result.target, result.credential) == ("b", "b/m2", "beta")
    assert text == result.text == "mock reply from m2 via beta: are you there"
    assert outcomes(result) == [("a/m1", "target_down", 503), ("b/m2", "ok", 200)]
    assert calls(mock, "alpha") == {"m1": {"503": 1}}


@pytest.mark.parametrize("fault", ["midstream", "cut"])
def test_stream_failure_after_the_first_chunk_is_an_error_not_a_fallback(
    mock_provider: MockFactory, daemon: DaemonFactory, fault: str
) -> None:
    mock, routerd = start(mock_provider, daemon, {"m1": ModelSpec(), "m2": ModelSpec()}, CHAIN)
    received: list[str] = []
    with Client(str(routerd.socket_path)) as client:
        with pytest.raises(TargetDown) as caught:
            for chunk in client.stream("main", user(f"breaking news [[mock:fail={fault}]]")):
                received.append(chunk.text)
        assert "".join(received)  # text had reached the client before the failure
        assert "mock reply from m1 via alpha: breaking news".startswith("".join(received))
        assert "stream failed after it began" in str(caught.value)
        assert [(a.target, a.outcome) for a in caught.value.attempts] == [("a/m1", "target_down")]
        assert "beta" not in mock.stats()["calls"]  # no fallback once bytes were out

        # The connection and the route still work.
        assert client.chat("main", user("after")).text.endswith("after")


def test_tool_calls_come_back_whole_streamed_or_not(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    _, routerd = start(mock_provider, daemon, {"m1": ModelSpec(), "m2": ModelSpec()}, CHAIN)
    prompt = user("weather in Oslo [[mock:tool=lookup]]")
    with Client(str(routerd.socket_path)) as client:
        result = client.chat("main", prompt, tools=TOOLS)
        assert result.finish_reason == "tool_calls"
        assert result.tool_calls is not None and len(result.tool_calls) == 1
        call = result.tool_calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "lookup"
        assert json.loads(call["function"]["arguments"]) == {"q": "weather in Oslo"}

        stream = client.stream("main", prompt, tools=TOOLS)
        deltas = [delta for chunk in stream for delta in chunk.tool_calls or []]
        streamed = stream.result
        assert streamed is not None and streamed.tool_calls is not None
        assert len(deltas) > 2  # the arguments arrived in pieces ...
        (whole,) = streamed.tool_calls  # ... and were put back together
        assert whole["function"]["name"] == "lookup" and whole["id"].startswith("call_")
        assert json.loads(whole["function"]["arguments"]) == {"q": "weather in Oslo"}
        assert streamed.finish_reason == "tool_calls"


def test_context_overflow_moves_on_then_fails_clearly(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routes = """
[routes.main]
chain = ["a/small", "b/big"]

[routes.solo]
chain = ["a/small"]
"""
    mock, routerd = start(
        mock_provider,
        daemon,
        {"small": ModelSpec(context_window=20), "big": ModelSpec()},
        routes,
    )
    long_prompt = user("long " + "word " * 60)  # ~75 tokens
    with Client(str(routerd.socket_path)) as client:
        result = client.chat("main", long_prompt)
        assert (result.target, result.credential) == ("b/big", "beta")
        assert outcomes(result) == [("a/small", "context_overflow", 400), ("b/big", "ok", 200)]

        with pytest.raises(ContextOverflow) as caught:
            client.chat("solo", long_prompt)
        assert all(a.outcome == "context_overflow" for a in caught.value.attempts)
        assert "context" in str(caught.value)

        # Too big a request says nothing about the key: short requests still use it.
        assert client.chat("solo", user("short")).target == "a/small"
        report = client.status()
    alpha = next(c for c in report.credentials if c.label == "alpha")
    assert alpha.state == "ready" and alpha.cooldown_left is None
    assert calls(mock, "beta") == {"big": {"200": 1}}


def test_deadline_fails_fast_past_the_reset_and_waits_within_it(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routes = """
[routes.main]
chain = ["a/m1"]
"""
    mock, routerd = start(
        mock_provider,
        daemon,
        {"m1": ModelSpec()},
        routes,
        alpha=KeySpec("alpha", rpm=1, window_s=3),
    )
    with Client(str(routerd.socket_path)) as client:
        first = client.chat("main", user("one"))
        window_opens = time.monotonic() + 3.0

        started = time.monotonic()
        with pytest.raises(RateLimited) as caught:
            client.chat("main", user("two"), deadline=1.0)
        assert time.monotonic() - started < 0.5  # no point waiting for a reset it cannot see
        assert caught.value.retry_after is not None
        assert 1.0 < caught.value.retry_after <= 3.5  # about when the window reopens

        result = client.chat("main", user("three"), deadline=10.0)
        assert time.monotonic() >= window_opens - 0.2  # it waited for the window ...
        assert result.text.endswith("three")  # ... and was served
    assert first.text.endswith("one")
    assert calls(mock, "alpha")["m1"].get("200") == 2
    assert calls(mock, "alpha")["m1"].get("429", 0) <= 1

"""Chains that mix providers, end to end: the real daemon, one mock speaking both dialects.

An Anthropic target and an OpenAI-compatible one sit in the same chains. Whichever serves,
the client gets the same OpenAI-shaped Result (text, usage, finish_reason, tool calls) and
the same chunks; only ``provider`` (and the attempt trail) says who answered.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from routerd_client import AsyncClient
from routerd_client.protocol import Result

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]

KEY_ANT, KEY_OAI = canary("ant"), canary("oai")
ENV = {"KEY_ANT": KEY_ANT, "KEY_OAI": KEY_OAI}
FAILURE_THRESHOLD = 3

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a fact up.",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
]
QUESTION = "capital of France"
ASK_TOOL = f"{QUESTION} [[mock:tool=lookup]]"
TOOL_RESULT = "Paris is the capital of France. " * 20


def mixed_mock(mock_provider: MockFactory) -> MockProcess:
    """Both dialects in one process: healthy and failing models for each."""
    return mock_provider(
        MockSpec(
            keys={KEY_ANT: KeySpec("ant"), KEY_OAI: KeySpec("oai")},
            models={
                "claude": ModelSpec(),
                "claude-down": ModelSpec(fault="529"),
                "gpt": ModelSpec(),
                "gpt-down": ModelSpec(fault="503"),
            },
        )
    )


def mixed_config(mock: MockProcess) -> str:
    return f"""
[breaker]
failure_threshold = {FAILURE_THRESHOLD}
open_s = 60

[providers.anthropic]
kind = "anthropic"
base_url = "{mock.url}"
credentials = [{{ label = "ant", key_env = "KEY_ANT" }}]

[providers.openai]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "oai", key_env = "KEY_OAI" }}]

[routes.claude_first]
chain = ["anthropic/claude", "openai/gpt"]
deadline_s = 20

[routes.claude_down]
chain = ["anthropic/claude-down", "openai/gpt"]
deadline_s = 20

[routes.gpt_down]
chain = ["openai/gpt-down", "anthropic/claude"]
deadline_s = 20
"""


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def calls(mock: MockProcess, label: str) -> dict[str, dict[str, int]]:
    """{model: {status: count}} of the mock's calls with one key."""
    found: dict[str, dict[str, int]] = mock.stats()["calls"].get(label, {})
    return found


def assemble(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole tool calls from OpenAI-style streamed deltas, as an OpenAI SDK user builds them."""
    whole: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = whole.setdefault(
            delta["index"],
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [whole[i] for i in sorted(whole)]


async def streamed(
    client: AsyncClient, route: str, messages: list[dict[str, Any]], **params: Any
) -> tuple[Result, str, list[dict[str, Any]], list[str | None]]:
    """Stream a request: (final Result, joined text, assembled tool calls, finish reasons)."""
    texts: list[str] = []
    deltas: list[dict[str, Any]] = []
    finishes: list[str | None] = []
    stream = client.stream(route, messages, **params)
    async for chunk in stream:
        texts.append(chunk.text)
        deltas.extend(chunk.tool_calls or ())
        if chunk.finish_reason is not None:
            finishes.append(chunk.finish_reason)
    assert stream.result is not None
    if "".join(texts):
        assert sum(1 for t in texts if t) >= 2, texts  # it really came in pieces
    return stream.result, "".join(texts), assemble(deltas), finishes


def assert_tool_call(reply_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One OpenAI-shaped call of the "lookup" tool whose arguments are a JSON string."""
    assert reply_calls is not None and len(reply_calls) == 1, reply_calls
    (call,) = reply_calls
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "lookup"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"q": QUESTION}
    return call


def follow_up(tool_call: dict[str, Any], said: str) -> list[dict[str, Any]]:
    """The next turn of a conversation whose assistant turn called the tool."""
    return [
        *user(ASK_TOOL),
        {"role": "assistant", "content": said or None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": tool_call["id"], "content": TOOL_RESULT},
    ]


async def test_an_anthropic_target_answers_in_openai_shape(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mixed_mock(mock_provider)
    routerd = daemon(mixed_config(mock), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="shape") as client:
        r = await client.chat("claude_first", user("hello there"), max_tokens=64)
        o = await client.chat("openai/gpt", user("hello there"), max_tokens=64)
        s, text, tool_calls, finishes = await streamed(
            client, "claude_first", user("tell me a longer story please"), max_tokens=64
        )

    assert (r.provider, r.target, r.model, r.credential) == (
        "anthropic",
        "anthropic/claude",
        "claude",
        "ant",
    )
    assert r.text == "mock reply from claude via ant: hello there"
    assert r.finish_reason == "stop" and r.tool_calls is None
    assert r.usage["prompt_tokens"] == math.ceil(len("hello there") / 4)
    assert r.usage["completion_tokens"] == math.ceil(len(r.text) / 4)
    assert r.usage["total_tokens"] == r.usage["prompt_tokens"] + r.usage["completion_tokens"]
    # The same request served by the OpenAI-compatible target looks the same but for names.
    assert o.provider == "openai"
    assert o.text.replace("gpt via oai", "claude via ant") == r.text
    assert (o.finish_reason, o.tool_calls) == (r.finish_reason, r.tool_calls)
    assert o.usage.keys() == r.usage.keys()
    assert o.usage["prompt_tokens"] == r.usage["prompt_tokens"]
    assert o.usage["completion_tokens"] == math.ceil(len(o.text) / 4)

    assert (s.provider, s.target) == ("anthropic", "anthropic/claude")
    assert text == s.text == "mock reply from claude via ant: tell me a longer story please"
    assert tool_calls == [] and s.tool_calls is None
    assert finishes == ["stop"] and s.finish_reason == "stop"
    assert s.usage["prompt_tokens"] > 0 and s.usage["completion_tokens"] > 0
    assert calls(mock, "ant") == {"claude": {"200": 2}}


async def test_tools_through_anthropic_in_openai_shape(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mixed_mock(mock_provider)
    routerd = daemon(mixed_config(mock), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="tools") as client:
        r = await client.chat("claude_first", user(ASK_TOOL), tools=TOOLS, max_tokens=64)
        s, text, streamed_calls, finishes = await streamed(
            client, "claude_first", user(ASK_TOOL), tools=TOOLS, max_tokens=64
        )
        call = assert_tool_call(r.tool_calls)
        # The next turn carries the assistant's tool call and the tool's result.
        answer = await client.chat(
            "claude_first", follow_up(call, r.text), tools=TOOLS, max_tokens=64
        )
        # A conversation whose tool call was minted by the OpenAI target continues on Claude,
        # and the other way round.
        o = await client.chat("openai/gpt", user(ASK_TOOL), tools=TOOLS, max_tokens=64)
        from_openai = await client.chat(
            "anthropic/claude",
            follow_up(assert_tool_call(o.tool_calls), o.text),
            tools=TOOLS,
            max_tokens=64,
        )
        to_openai = await client.chat(
            "openai/gpt", follow_up(call, r.text), tools=TOOLS, max_tokens=64
        )

    assert r.provider == "anthropic" and r.finish_reason == "tool_calls"
    assert call["id"].startswith("toolu_")
    assert s.provider == "anthropic" and s.finish_reason == "tool_calls"
    assert finishes == ["tool_calls"]
    assert_tool_call(streamed_calls)
    assert s.tool_calls == streamed_calls  # the Result sums up exactly what was streamed
    assert text == s.text

    for reply in (answer, from_openai):
        assert reply.provider == "anthropic"
        assert reply.finish_reason == "stop" and reply.tool_calls is None
        assert reply.text == "mock reply from claude via ant: "
        # The tool's result reached the model: it counts in the prompt.
        assert reply.usage["prompt_tokens"] >= len(TOOL_RESULT) // 4
    # (The OpenAI mock reads its directive from the last user message, so it calls again.)
    assert to_openai.provider == "openai"
    assert to_openai.usage["prompt_tokens"] >= len(TOOL_RESULT) // 4
    assert o.provider == "openai" and o.finish_reason == "tool_calls"
    assert o.tool_calls is not None and o.tool_calls[0]["id"].startswith("call_")
    assert calls(mock, "ant") == {"claude": {"200": 4}}
    assert calls(mock, "oai") == {"gpt": {"200": 2}}


async def serve_everything(client: AsyncClient, route: str) -> list[Result]:
    """A plain chat, a tool call, a stream and a streamed tool call, twice over, in turn."""
    replies: list[Result] = []
    for _ in range(2):
        replies.append(await client.chat(route, user("plain"), max_tokens=64))
        tool = await client.chat(route, user(ASK_TOOL), tools=TOOLS, max_tokens=64)
        assert tool.finish_reason == "tool_calls"
        assert_tool_call(tool.tool_calls)
        replies.append(tool)
        s, text, _, finishes = await streamed(client, route, user("a streamed one"), max_tokens=64)
        assert text == s.text and s.text.endswith("a streamed one") and finishes == ["stop"]
        replies.append(s)
        s, _, tool_calls, finishes = await streamed(
            client, route, user(ASK_TOOL), tools=TOOLS, max_tokens=64
        )
        assert finishes == ["tool_calls"] and s.tool_calls == tool_calls
        assert_tool_call(tool_calls)
        replies.append(s)
    return replies


async def test_anthropic_primary_down_the_openai_fallback_answers(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mixed_mock(mock_provider)
    routerd = daemon(mixed_config(mock), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="down") as client:
        replies = await serve_everything(client, "claude_down")
        report = await client.status()

    assert {(r.provider, r.target, r.credential) for r in replies} == {
        ("openai", "openai/gpt", "oai")
    }
    first = replies[0].attempts
    assert [(a.target, a.outcome, a.status) for a in first] == [
        ("anthropic/claude-down", "target_down", 529),
        ("openai/gpt", "ok", 200),
    ]
    # The dead target got one probe at a time until its breaker opened, and nothing after.
    assert calls(mock, "ant") == {"claude-down": {"529": FAILURE_THRESHOLD}}
    assert sum(len(r.attempts) for r in replies) == len(replies) + FAILURE_THRESHOLD
    breakers = {t.target: t.breaker for t in report.targets}
    assert breakers["anthropic/claude-down"] == "open"
    assert breakers["openai/gpt"] == "closed"
    # The key is fine: an overloaded target says nothing about it.
    assert {c.label: c.state for c in report.credentials} == {"ant": "ready", "oai": "ready"}


async def test_openai_primary_down_the_anthropic_fallback_answers(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mixed_mock(mock_provider)
    routerd = daemon(mixed_config(mock), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="down") as client:
        replies = await serve_everything(client, "gpt_down")
        report = await client.status()

    assert {(r.provider, r.target, r.credential) for r in replies} == {
        ("anthropic", "anthropic/claude", "ant")
    }
    assert [(a.target, a.outcome, a.status) for a in replies[0].attempts] == [
        ("openai/gpt-down", "target_down", 503),
        ("anthropic/claude", "ok", 200),
    ]
    assert calls(mock, "oai") == {"gpt-down": {"503": FAILURE_THRESHOLD}}
    assert calls(mock, "ant") == {"claude": {"200": len(replies)}}
    breakers = {t.target: t.breaker for t in report.targets}
    assert breakers["openai/gpt-down"] == "open"


async def test_a_bad_anthropic_key_is_called_at_most_once(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    good, revoked, broke = canary("good"), canary("revoked"), canary("broke")
    mock = mock_provider(
        MockSpec(
            keys={
                revoked: KeySpec("revoked", kind="invalid"),
                broke: KeySpec("broke", kind="no_quota"),
                good: KeySpec("good"),
            },
            models={"claude": ModelSpec()},
        )
    )
    config = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{mock.url}"
credentials = [
  {{ label = "revoked", key_env = "KEY_REVOKED" }},
  {{ label = "broke", key_env = "KEY_BROKE" }},
  {{ label = "good", key_env = "KEY_GOOD" }},
]

[routes.main]
chain = ["anthropic/claude"]
deadline_s = 20
"""
    env = {"KEY_REVOKED": revoked, "KEY_BROKE": broke, "KEY_GOOD": good}
    routerd = daemon(config, env=env)
    replies: list[Result] = []
    async with AsyncClient(str(routerd.socket_path), name="pool") as client:

        async def one(n: int) -> None:
            if n % 3:
                replies.append(await client.chat("main", user(f"hi {n}"), max_tokens=64))
            else:
                s, text, _, _ = await streamed(client, "main", user(f"hi {n}"), max_tokens=64)
                assert text == s.text
                replies.append(s)

        async with anyio.create_task_group() as tg:
            for n in range(24):
                tg.start_soon(one, n)
        report = await client.status()

    assert len(replies) == 24
    assert {r.credential for r in replies} == {"good"}
    by_label = {label: models["claude"] for label, models in mock.stats()["calls"].items()}
    assert by_label == {"revoked": {"401": 1}, "broke": {"400": 1}, "good": {"200": 24}}
    states = {c.label: (c.state, c.reason) for c in report.credentials}
    assert states["revoked"] == ("disabled", "auth failed (401)")
    assert states["broke"] == ("parked", "quota exhausted")
    assert states["good"][0] == "ready"
    log = routerd.log_text()
    assert all(key not in log for key in env.values())


async def test_anthropic_429s_spread_a_burst_over_the_keys(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    rpm, window_s = 3, 2.0
    keys = {canary(f"k{i}"): KeySpec(f"k{i}", rpm=rpm, window_s=window_s) for i in range(3)}
    mock = mock_provider(MockSpec(keys=keys, models={"claude": ModelSpec()}))
    labels = [spec.label for spec in keys.values()]
    creds = ", ".join(f'{{ label = "{k}", key_env = "KEY_{k.upper()}" }}' for k in labels)
    config = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{mock.url}"
credentials = [{creds}]

[routes.main]
chain = ["anthropic/claude"]
deadline_s = 30
"""
    env = {f"KEY_{spec.label.upper()}": key for key, spec in keys.items()}
    routerd = daemon(config, env=env)
    k0 = next(key for key, spec in keys.items() if spec.label == "k0")
    async with httpx.AsyncClient(base_url=mock.url) as direct:
        # Another program spends k0's window, so routerd's first call with it meets a 429
        # carrying anthropic-ratelimit-* headers and a retry-after.
        for _ in range(rpm):
            spent = await direct.post(
                "/v1/messages",
                headers={"x-api-key": k0, "anthropic-version": "2023-06-01"},
                json={"model": "claude", "max_tokens": 8, "messages": user("elsewhere")},
            )
            assert spent.status_code == 200
        refused = await direct.post(
            "/v1/messages",
            headers={"x-api-key": k0, "anthropic-version": "2023-06-01"},
            json={"model": "claude", "max_tokens": 8, "messages": user("elsewhere")},
        )
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
    baseline = {
        label: dict(models.get("claude", {})) for label, models in mock.stats()["calls"].items()
    }

    total, concurrency = 18, 6
    replies: list[Result | Exception] = []
    started = time.monotonic()
    async with AsyncClient(str(routerd.socket_path), name="burst") as client:
        counter = iter(range(total))

        async def worker() -> None:
            for n in counter:
                try:
                    replies.append(await client.chat("main", user(f"burst {n}"), max_tokens=16))
                except Exception as exc:  # collected, so the assertion can say what failed
                    replies.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    wall = time.monotonic() - started

    failures = [r for r in replies if isinstance(r, Exception)]
    assert failures == []
    served = {label: 0 for label in labels}
    for r in replies:
        assert isinstance(r, Result)
        served[r.credential] += 1
    assert all(count >= rpm for count in served.values()), served
    seen: dict[str, dict[str, int]] = {}
    for label, models in mock.stats()["calls"].items():
        now = models.get("claude", {})
        seen[label] = {s: n - baseline.get(label, {}).get(s, 0) for s, n in now.items()}
    throttled = {label: counts.get("429", 0) for label, counts in seen.items()}
    # One 429 on k0 (the window someone else spent), then routerd keeps to the headers.
    assert throttled == {"k0": 1, "k1": 0, "k2": 0}, seen
    # 3 keys x 3 requests per 2 s, k0's first window spent elsewhere: 18 requests need two
    # more windows after the first; the resets come in whole seconds, rounded up.
    assert wall < 4 * window_s + 3, wall

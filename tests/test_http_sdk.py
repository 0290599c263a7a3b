"""The official OpenAI and Anthropic SDKs, unmodified, routed through the daemon's HTTP front.

Each SDK talks to the real daemon over its Unix socket (through the SDK's own HTTP client
with a Unix-socket transport) or over TCP with the token. They see normal completions,
streams and tool calls; a fallback they never notice; and routerd's failures as their own
exception types, which they do not retry (routerd already did).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from routerd.mock import KeySpec, MockSpec, ModelSpec
from tests.conftest import canary
from tests.test_http_front import Front, running_front

KEYS = {
    name: canary(name)
    for name in ("main", "primary", "backup", "lim_oa", "lim_an", "down", "flaky")
}
LOOKUP = {"q": "where"}

CONFIG = """
[breaker]
failure_threshold = 5

[providers.mock]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "main", key_env = "KEY_MAIN" }]

[providers.a]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "primary", key_env = "KEY_PRIMARY" }]

[providers.b]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "backup", key_env = "KEY_BACKUP" }]

[providers.lim_oa]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "lim_oa", key_env = "KEY_LIM_OA" }]

[providers.lim_an]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "lim_an", key_env = "KEY_LIM_AN" }]

[providers.down]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "down", key_env = "KEY_DOWN" }]

[providers.flaky]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "flaky", key_env = "KEY_FLAKY" }]

[models."mock/tiny"]
context_window = 64

[routes.main]
chain = ["mock/m1"]

[routes.tiny]
chain = ["mock/tiny"]

[routes.fallback]
chain = ["a/dead", "b/m1"]

[routes.limited_openai]
chain = ["lim_oa/m1"]
deadline_s = 2

[routes.limited_anthropic]
chain = ["lim_an/m1"]
deadline_s = 2

[routes.down_openai]
chain = ["down/d1"]
retries = 0

[routes.down_anthropic]
chain = ["down/d2"]
retries = 0

[routes.flaky]
chain = ["flaky/m1"]
retries = 0
"""


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    keys = {secret: KeySpec(label) for label, secret in KEYS.items()}
    for label in ("lim_oa", "lim_an"):
        # One request a minute: the first is served, then routerd knows the window is spent.
        keys[KEYS[label]] = KeySpec(label, rpm=1, window_s=60)
    spec = MockSpec(
        keys=keys,
        models={
            "m1": ModelSpec(),
            "tiny": ModelSpec(context_window=64),
            "dead": ModelSpec(fault="503"),
            "d1": ModelSpec(fault="503"),
            "d2": ModelSpec(fault="503"),
        },
    )
    env = {f"KEY_{label.upper()}": secret for label, secret in KEYS.items()}
    with running_front(spec, CONFIG, env) as running:
        yield running


def _transport_module(sdk: ModuleType) -> Any:
    """The httpx flavour the SDK's clients are built on (httpx2 from openai 3 / anthropic 2)."""
    base = sdk._base_client
    return getattr(base, "httpx2", None) or base.httpx


class Sent:
    """Counts the HTTP requests an SDK client sends, retries included."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: Any) -> None:
        self.count += 1


def openai_client(
    front: Front, sent: Sent | None = None, *, tcp_token: str | None = None
) -> openai.OpenAI:
    """An OpenAI SDK client on the Unix socket, or on TCP when given a token."""
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [sent]} if sent is not None else {}
    if tcp_token is not None:
        http = openai.DefaultHttpxClient(event_hooks=hooks)
        return openai.OpenAI(api_key=tcp_token, base_url=f"http://{front.tcp}/v1", http_client=http)
    transport = _transport_module(openai).HTTPTransport(uds=str(front.uds))
    http = openai.DefaultHttpxClient(transport=transport, event_hooks=hooks)
    return openai.OpenAI(api_key="unused", base_url="http://routerd/v1", http_client=http)


def anthropic_client(
    front: Front, sent: Sent | None = None, *, tcp_token: str | None = None
) -> anthropic.Anthropic:
    """An Anthropic SDK client on the Unix socket, or on TCP when given a token."""
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [sent]} if sent is not None else {}
    if tcp_token is not None:
        http = anthropic.DefaultHttpxClient(event_hooks=hooks)
        return anthropic.Anthropic(
            api_key=tcp_token, base_url=f"http://{front.tcp}", http_client=http
        )
    transport = _transport_module(anthropic).HTTPTransport(uds=str(front.uds))
    http = anthropic.DefaultHttpxClient(transport=transport, event_hooks=hooks)
    return anthropic.Anthropic(api_key="unused", base_url="http://routerd", http_client=http)


def oa(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def an(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


TOOLS_OPENAI: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
TOOLS_ANTHROPIC: list[Any] = [
    {
        "name": "lookup",
        "description": "Look something up",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


# ---- OpenAI SDK --------------------------------------------------------------------------


def test_openai_chat_over_the_unix_socket(front: Front) -> None:
    with openai_client(front) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="main", messages=oa("hello"), max_tokens=32
        )
        completion = raw.parse()
    assert completion.choices[0].message.content == "mock reply from m1 via main: hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "m1"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-routerd-target"] == "mock/m1"
    assert raw.headers["x-routerd-credential"] == "main"
    # A "provider/model" target works as a model name too, without a route of its own.
    with openai_client(front) as client:
        direct = client.chat.completions.create(model="mock/m1", messages=oa("direct"))
    assert direct.choices[0].message.content == "mock reply from m1 via main: direct"


def test_openai_stream_sends_role_deltas_finish_and_usage(front: Front) -> None:
    with openai_client(front) as client:
        chunks = list(
            client.chat.completions.create(
                model="main",
                messages=oa("stream me"),
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    # Every chunk names the serving model, as the unstreamed reply does, not the route.
    assert {c.model for c in chunks} == {"m1"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock reply from m1 via main: stream me"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0


def test_openai_tool_calls_whole_and_streamed(front: Front) -> None:
    with openai_client(front) as client:
        completion = client.chat.completions.create(
            model="main", messages=oa("where [[mock:tool=lookup]]"), tools=TOOLS_OPENAI
        )
        stream = client.chat.completions.create(
            model="main",
            messages=oa("where [[mock:tool=lookup]]"),
            tools=TOOLS_OPENAI,
            stream=True,
        )
        chunks = list(stream)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == LOOKUP
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function is not None and pieces[0].function.name == "lookup"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function is not None)
    assert json.loads(arguments) == LOOKUP
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_openai_never_notices_a_fallback(front: Front) -> None:
    with openai_client(front) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fallback", messages=oa("still here")
        )
    assert raw.parse().choices[0].message.content == "mock reply from m1 via backup: still here"
    assert raw.headers["x-routerd-target"] == "b/m1"
    assert raw.headers["x-routerd-attempts"] == "2"
    assert front.calls("primary", "dead") == {"503": 1}


def test_openai_errors_are_its_own_types_and_not_retried(front: Front) -> None:
    sent = Sent()
    with openai_client(front, sent) as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="no-such-route", messages=oa("x"))
        assert unknown.value.code == "model_not_found"
        assert sent.count == 1

        with pytest.raises(openai.BadRequestError) as overflow:
            client.chat.completions.create(model="tiny", messages=oa("word " * 400))
        assert overflow.value.code == "context_length_exceeded"
        assert "maximum context length" in overflow.value.message
        assert sent.count == 2

        client.chat.completions.create(model="limited_openai", messages=oa("first"))
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="limited_openai", messages=oa("second"))
        headers = limited.value.response.headers
        assert headers["x-should-retry"] == "false"
        assert 1 <= int(headers["retry-after"]) <= 60
        assert int(headers["retry-after-ms"]) > 0
        assert sent.count == 4  # the SDK retries 429s by default; not this one

        with pytest.raises(openai.InternalServerError) as down:
            client.chat.completions.create(model="down_openai", messages=oa("x"))
        assert down.value.status_code == 503
        assert sent.count == 5
    # routerd made its one attempt (retries = 0) and the SDK added none.
    assert front.calls("down", "d1") == {"503": 1}
    assert front.calls("lim_oa", "m1") == {"200": 1}


def test_openai_stream_failing_midway_raises_after_the_text_so_far(front: Front) -> None:
    got: list[str] = []
    with openai_client(front) as client:
        stream = client.chat.completions.create(
            model="flaky", messages=oa("half [[mock:fail=midstream]]"), stream=True
        )
        with pytest.raises(openai.APIError) as failed:
            for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got)  # the first deltas arrived before the failure
    assert "stream failed after it began" in failed.value.message


def test_openai_over_tcp_with_the_token(front: Front) -> None:
    with openai_client(front, tcp_token=front.token) as client:
        completion = client.chat.completions.create(model="main", messages=oa("tcp"))
        assert completion.choices[0].message.content == "mock reply from m1 via main: tcp"
        assert [m.id for m in client.models.list()][:2] == ["main", "tiny"]
    with (
        openai_client(front, tcp_token="wrong") as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(model="main", messages=oa("tcp"))


# ---- Anthropic SDK -----------------------------------------------------------------------


def test_anthropic_messages_create(front: Front) -> None:
    with anthropic_client(front) as client:
        message = client.messages.create(
            model="main",
            max_tokens=64,
            system="be brief",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        )
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert message.content[0].text == "mock reply from m1 via main: hello"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


def test_anthropic_stream_text(front: Front) -> None:
    with (
        anthropic_client(front) as client,
        client.messages.stream(model="main", max_tokens=64, messages=an("stream me")) as stream,
    ):
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == "mock reply from m1 via main: stream me"
    # message_start names the serving model, as the unstreamed reply does, not the route.
    assert final.model == "m1"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_anthropic_tool_use_streamed_then_answered(front: Front) -> None:
    with anthropic_client(front) as client:
        with client.messages.stream(
            model="main",
            max_tokens=64,
            tools=TOOLS_ANTHROPIC,
            messages=an("where [[mock:tool=lookup]]"),
        ) as stream:
            events = [event.type for event in stream]
            final = stream.get_final_message()
        tool = final.content[0]
        assert tool.type == "tool_use" and tool.name == "lookup" and tool.input == LOOKUP
        assert final.stop_reason == "tool_use"
        assert events[0] == "message_start" and events[-1] == "message_stop"
        assert "content_block_start" in events and "content_block_stop" in events

        # The tool's result goes back as a tool_result block; the model answers in text.
        answer = client.messages.create(
            model="main",
            max_tokens=64,
            tools=TOOLS_ANTHROPIC,
            messages=[
                *an("where [[mock:tool=lookup]]"),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input}
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": tool.id, "content": "here"},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
        )
    assert answer.content[0].type == "text"
    assert answer.content[0].text == "mock reply from m1 via main: thanks"


def test_anthropic_errors_are_its_own_types_and_not_retried(front: Front) -> None:
    sent = Sent()
    with anthropic_client(front, sent) as client:
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(model="no-such-route", max_tokens=5, messages=an("x"))
        with pytest.raises(anthropic.BadRequestError) as overflow:
            client.messages.create(model="tiny", max_tokens=5, messages=an("word " * 400))
        assert "prompt is too long" in overflow.value.message
        client.messages.create(model="limited_anthropic", max_tokens=5, messages=an("first"))
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(model="limited_anthropic", max_tokens=5, messages=an("again"))
        with pytest.raises(anthropic.OverloadedError):
            client.messages.create(model="down_anthropic", max_tokens=5, messages=an("x"))
    assert sent.count == 5
    assert front.calls("down", "d2") == {"503": 1}


def test_anthropic_stream_failing_midway_sends_an_error_event(front: Front) -> None:
    got: list[str] = []
    with anthropic_client(front) as client:
        stream = client.messages.stream(
            model="flaky", max_tokens=16, messages=an("half [[mock:fail=midstream]]")
        )
        with pytest.raises(anthropic.APIStatusError) as failed, stream as events:
            got.extend(events.text_stream)
    assert "".join(got)  # the first deltas arrived before the failure
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"


def test_anthropic_over_tcp_with_the_token(front: Front) -> None:
    with anthropic_client(front, tcp_token=front.token) as client:
        message = client.messages.create(model="main", max_tokens=16, messages=an("tcp"))
        assert message.content[0].type == "text"
        assert message.content[0].text == "mock reply from m1 via main: tcp"
    with (
        anthropic_client(front, tcp_token="wrong") as client,
        pytest.raises(anthropic.AuthenticationError),
    ):
        client.messages.create(model="main", max_tokens=16, messages=an("tcp"))

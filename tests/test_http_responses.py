"""The OpenAI Responses API (``/v1/responses``) through the daemon, driven by the official SDK.

The SDK talks to a real daemon over its Unix socket, in front of the mock provider; every
event of a stream is parsed by the SDK's own types (and ``responses.stream`` checks their
order). Errors arrive as the SDK's exceptions after exactly one HTTP request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from openai.types.responses import ResponseCreatedEvent, ResponseFailedEvent

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary
from tests.test_http_front import Front, running_front
from tests.test_http_sdk import Sent, openai_client

MockFactory = Callable[[MockSpec], MockProcess]
KEYS = {name: canary(name) for name in ("main", "primary", "backup", "down", "ant")}

CONFIG = """
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

[providers.down]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{ label = "down", key_env = "KEY_DOWN" }]

[providers.claude]
kind = "anthropic"
base_url = "{base_url}"
credentials = [{ label = "ant", key_env = "KEY_ANT" }]

[routes.main]
chain = ["mock/m1"]

[routes.fallback]
chain = ["a/dead", "b/m1"]

[routes.down]
chain = ["down/d1"]
retries = 0

[routes.claude]
chain = ["claude/claude-m"]
"""

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look something up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    spec = MockSpec(
        keys={secret: KeySpec(label) for label, secret in KEYS.items()},
        models={
            "m1": ModelSpec(),
            "claude-m": ModelSpec(),
            "dead": ModelSpec(fault="503"),
            "d1": ModelSpec(fault="503"),
        },
    )
    env = {f"KEY_{label.upper()}": secret for label, secret in KEYS.items()}
    with running_front(spec, CONFIG, env) as running:
        yield running


def test_a_plain_response_with_instructions(front: Front) -> None:
    with openai_client(front) as client:
        raw = client.responses.with_raw_response.create(
            model="main", input="hello", instructions="Be brief.", max_output_tokens=64
        )
        response = raw.parse()
    assert response.status == "completed"
    assert response.output_text == "mock reply from m1 via main: hello"
    assert [item.type for item in response.output] == ["message"]
    assert response.model == "m1"
    assert response.instructions == "Be brief."
    assert response.max_output_tokens == 64
    assert response.usage is not None and response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.id.startswith("resp_")
    assert raw.headers["x-routerd-target"] == "mock/m1"


def test_input_items_with_text_parts(front: Front) -> None:
    with openai_client(front) as client:
        response = client.responses.create(
            model="main",
            input=[
                {"role": "developer", "content": "Answer plainly."},
                {"role": "user", "content": [{"type": "input_text", "text": "parts work"}]},
            ],
        )
    assert response.output_text == "mock reply from m1 via main: parts work"


def test_function_tools_and_a_function_call_output_round_trip(front: Front) -> None:
    with openai_client(front) as client:
        first = client.responses.create(
            model="main", input="where [[mock:tool=lookup]]", tools=TOOLS
        )
        calls = [item for item in first.output if item.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "lookup"
        assert json.loads(calls[0].arguments) == {"q": "where"}
        assert calls[0].call_id
        second = client.responses.create(
            model="main",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "x"}],
            tools=TOOLS,
        )
        # The same turn sent whole, as a client without previous_response_id would.
        replayed = client.responses.create(
            model="main",
            input=[
                {"role": "user", "content": "where [[mock:tool=lookup]]"},
                {
                    "type": "function_call",
                    "call_id": calls[0].call_id,
                    "name": "lookup",
                    "arguments": calls[0].arguments,
                },
                {"type": "function_call_output", "call_id": calls[0].call_id, "output": "x"},
            ],
            tools=TOOLS,
        )
    assert second.status == "completed" and replayed.status == "completed"
    assert second.previous_response_id == first.id
    assert second.usage is not None and replayed.usage is not None
    # The stored turn reached the provider: the prompt was as long as the replayed one.
    assert second.usage.input_tokens == replayed.usage.input_tokens


def test_previous_response_id_carries_the_conversation_and_store_can_be_read(
    front: Front,
) -> None:
    with openai_client(front) as client:
        first = client.responses.create(model="main", input="my name is Ada")
        follow = client.responses.create(
            model="main", input="what is my name", previous_response_id=first.id
        )
        alone = client.responses.create(model="main", input="what is my name")
        kept = client.responses.retrieve(first.id)
        assert kept.id == first.id and kept.output_text == first.output_text
        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
    assert follow.usage is not None and alone.usage is not None
    assert follow.usage.input_tokens > alone.usage.input_tokens


def test_an_unknown_previous_response_is_a_404_sent_once(front: Front) -> None:
    sent = Sent()
    with openai_client(front, sent) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model="main", input="hi", previous_response_id="resp_nope")
        assert "resp_nope" in str(caught.value)
        unstored = client.responses.create(model="main", input="hi", store=False)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
    assert sent.count == 3  # one request per call: the 404s are not retried


def test_a_stream_is_the_documented_event_sequence(front: Front) -> None:
    with (
        openai_client(front) as client,
        client.responses.stream(model="main", input="stream me") as stream,
    ):
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") > 1
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "mock reply from m1 via main: stream me"
    assert final.status == "completed" and final.usage is not None
    created = events[0]
    assert isinstance(created, ResponseCreatedEvent)
    assert created.response.model == final.model == "m1"


def test_a_streamed_function_call(front: Front) -> None:
    with openai_client(front) as client:
        events = list(
            client.responses.create(
                model="main", input="where [[mock:tool=lookup]]", tools=TOOLS, stream=True
            )
        )
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"q": "where"}
    completed = events[-1]
    assert completed.type == "response.completed"
    assert [item.type for item in completed.response.output] == ["function_call"]


def test_a_failure_mid_stream_is_an_error_event_and_response_failed(front: Front) -> None:
    with openai_client(front) as client:
        events = list(
            client.responses.create(
                model="main", input="break [[mock:fail=midstream]]", stream=True
            )
        )
    kinds = [event.type for event in events]
    assert "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1]
    assert isinstance(failed, ResponseFailedEvent)
    assert failed.response.status == "failed"
    assert failed.response.error is not None


def test_errors_are_the_sdks_own_exceptions_after_one_request(front: Front) -> None:
    sent = Sent()
    with openai_client(front, sent) as client:
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="no-such-route", input="hi")
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(
                model="main", input="hi", tools=[{"type": "web_search_preview"}]
            )
        assert "web_search_preview" in str(caught.value)
        with pytest.raises(openai.APIStatusError) as down:
            client.responses.create(model="down", input="hi")
        assert down.value.status_code == 503
    assert sent.count == 3


def test_a_fallback_the_sdk_never_notices(front: Front) -> None:
    with openai_client(front) as client:
        raw = client.responses.with_raw_response.create(model="fallback", input="hi")
    assert raw.parse().output_text == "mock reply from m1 via backup: hi"
    assert raw.headers["x-routerd-target"] == "b/m1"
    assert raw.headers["x-routerd-attempts"] == "2"


def test_an_anthropic_target_behind_a_responses_request(front: Front) -> None:
    with openai_client(front) as client:
        response = client.responses.create(model="claude", input="hello claude")
        streamed = client.responses.create(model="claude", input="stream claude", stream=True)
        final = next(e for e in streamed if e.type == "response.completed").response
    assert response.output_text == "mock reply from claude-m via ant: hello claude"
    assert final.output_text == "mock reply from claude-m via ant: stream claude"


def test_stored_responses_survive_a_restart_of_the_daemon(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    # The store is written beside the state file at shutdown; the next daemon reads it.
    mock = mock_provider(MockSpec(keys={KEYS["main"]: KeySpec("main")}, models={"m1": ModelSpec()}))
    uds = short_dir / "http.sock"
    config = f"""
[server]
http_socket = "{uds}"
state_file = "{short_dir / "state.msgpack"}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
"""
    env = {"KEY_MAIN": KEYS["main"]}

    def client() -> openai.OpenAI:
        http = openai.DefaultHttpxClient(transport=httpx2.HTTPTransport(uds=str(uds)))
        return openai.OpenAI(api_key="unused", base_url="http://routerd/v1", http_client=http)

    first_daemon = daemon(config, env=env, name="first")
    with client() as sdk:
        first = sdk.responses.create(model="main", input="remember me")
    assert first_daemon.stop() == 0
    daemon(config, env=env, name="second")
    with client() as sdk:
        kept = sdk.responses.retrieve(first.id)
        follow = sdk.responses.create(model="main", input="and now", previous_response_id=first.id)
    assert kept.output_text == first.output_text
    assert follow.status == "completed"
    saved = (short_dir / "state.msgpack.responses").read_bytes()
    assert KEYS["main"].encode() not in saved


def test_raw_http_without_the_sdk(front: Front) -> None:
    transport = httpx.HTTPTransport(uds=str(front.uds))
    with httpx.Client(transport=transport, base_url="http://routerd") as http:
        reply = http.post("/v1/responses", json={"model": "main", "input": "raw"})
        missing = http.get("/v1/responses/resp_missing")
        refused = http.post("/v1/responses", json={"model": "main"})
    assert reply.status_code == 200 and reply.json()["object"] == "response"
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert refused.status_code == 400 and "input" in refused.json()["error"]["message"]

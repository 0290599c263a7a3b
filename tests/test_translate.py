"""OpenAI chat <-> Anthropic Messages translation: requests, whole replies and streams."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from routerd.core.calls import Delta
from routerd.core.outcome import FailureClass, UpstreamFailure
from routerd.core.tokens import output_allowance, requested_max_tokens
from routerd.dispatch.attempt import merge_tool_calls
from routerd.translate import (
    AnthropicStreamTranslator,
    TranslationError,
    anthropic_to_completion,
    finish_reason,
    openai_to_anthropic,
    stop_reason,
)

MODEL = "claude-sonnet-4-5"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def translate(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return openai_to_anthropic({"model": "client-alias", "messages": messages, **extra}, MODEL)


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- request: messages ----------------------------------------------------------------------


def test_a_plain_chat_becomes_a_minimal_messages_request() -> None:
    out = translate([{"role": "user", "content": "hi"}])
    assert out == {
        "model": MODEL,
        "max_tokens": 4096,  # Anthropic requires it; OpenAI clients often leave it out
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_one_system_message_becomes_the_system_string() -> None:
    out = translate([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}])
    assert out["system"] == "Be terse."
    assert out["messages"] == [{"role": "user", "content": "hi"}]


def test_system_messages_anywhere_and_top_level_system_are_gathered_in_order() -> None:
    out = translate(
        [
            {"role": "system", "content": "Rule one."},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": [{"type": "text", "text": "Rule two."}]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "Rule three."},
            {"role": "user", "content": "bye"},
        ],
        system="Top rule.",
    )
    assert out["system"] == [
        {"type": "text", "text": "Top rule."},
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "Rule two."},
        {"type": "text", "text": "Rule three."},
    ]
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]


def test_cache_control_on_a_system_part_is_kept() -> None:
    part = {"type": "text", "text": "Long prompt", "cache_control": {"type": "ephemeral"}}
    out = translate([{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}])
    assert out["system"] == [part]


def test_images_become_base64_or_url_sources() -> None:
    out = translate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                ],
            }
        ]
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_a_pdf_file_part_becomes_a_document() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    out = translate([{"role": "user", "content": [part]}])
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        }
    ]


@pytest.mark.parametrize(
    ("part", "complaint"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "ftp://host/cat.png"}}, "http"),
        ({"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "file ids"),
    ],
)
def test_parts_anthropic_cannot_take_are_refused(part: dict[str, Any], complaint: str) -> None:
    with pytest.raises(TranslationError, match=complaint):
        translate([{"role": "user", "content": [part]}])


def test_consecutive_turns_of_one_role_are_merged() -> None:
    out = translate(
        [
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": ""},  # empty: Anthropic would refuse it, so it goes
            {"role": "user", "content": "third"},
        ]
    )
    assert out["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": "third"},
    ]


def test_tool_calls_and_results_round_trip_a_parallel_call() -> None:
    out = translate(
        [
            {"role": "user", "content": "Weather in Oslo and Paris?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    call("call_1", "get_weather", '{"location": "Oslo"}'),
                    call("call_2", "get_weather", '{"location": "Paris"}'),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "18C"}],
            },
            {"role": "user", "content": "Thanks, and tomorrow?"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking both."},
                {
                    "type": "tool_use",
                    "id": "call_1",
                    "name": "get_weather",
                    "input": {"location": "Oslo"},
                },
                {
                    "type": "tool_use",
                    "id": "call_2",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
            ],
        },
        {
            # Both results answer one assistant turn, so they share one user turn, first.
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "-3C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "18C"},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ]


def test_tool_results_are_moved_before_text_in_their_user_turn() -> None:
    out = translate(
        [
            {"role": "assistant", "content": None, "tool_calls": [call("call_1", "f", "{}")]},
            {"role": "user", "content": "note first"},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
        ]
    )
    assert [b["type"] for b in out["messages"][1]["content"]] == ["tool_result", "text"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ('{"a": ', {"_raw": '{"a": '}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
)
def test_tool_call_arguments_become_an_input_object(
    arguments: str, expected: dict[str, Any]
) -> None:
    out = translate([{"role": "assistant", "tool_calls": [call("call_1", "f", arguments)]}])
    assert out["messages"][0]["content"][0]["input"] == expected


def test_foreign_tool_ids_are_made_acceptable_on_both_sides() -> None:
    out = translate(
        [
            {"role": "assistant", "tool_calls": [call("functions.f:0", "f", "{}")]},
            {"role": "tool", "tool_call_id": "functions.f:0", "content": "ok"},
        ]
    )
    assert out["messages"][0]["content"][0]["id"] == "functions_f_0"
    assert out["messages"][1]["content"][0]["tool_use_id"] == "functions_f_0"


def test_unknown_roles_are_refused() -> None:
    with pytest.raises(TranslationError, match="role 'function'"):
        translate([{"role": "function", "name": "f", "content": "x"}])


# --- request: tools and parameters ------------------------------------------------------


def test_tools_become_input_schemas() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    out = translate([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL, bare])
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
    ],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    extra: dict[str, Any] = {"tools": [WEATHER_TOOL], "tool_choice": choice}
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    out = translate([{"role": "user", "content": "hi"}], **extra)
    assert out["tool_choice"] == expected
    assert len(out["tools"]) == 1  # "none" keeps them: a history with tool calls needs them


def test_tool_choice_without_tools_is_dropped() -> None:
    out = translate([{"role": "user", "content": "hi"}], tool_choice="auto")
    assert "tool_choice" not in out and "tools" not in out


def test_parameters_are_mapped_and_openai_only_fields_dropped() -> None:
    body = {
        "model": "client-alias",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "max_completion_tokens": 200,
        "temperature": 1.6,
        "top_p": 0.9,
        "stop": "END",
        "stream": True,
        "user": "agent-7",
        "n": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"},
        "seed": 7,
        "stream_options": {"include_usage": True},
        "metadata": {"run": "x"},
    }
    before = copy.deepcopy(body)
    out = openai_to_anthropic(body, MODEL)
    assert out == {
        "model": MODEL,
        "max_tokens": 200,  # max_completion_tokens is OpenAI's current name and wins
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 1.0,  # OpenAI allows up to 2, Anthropic up to 1
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "agent-7"},
    }
    assert body == before  # the same body goes to the next target in the chain


def test_stop_list_max_tokens_and_a_no_op_top_p() -> None:
    out = translate(
        [{"role": "user", "content": "hi"}],
        stop=["\n\nHuman:", "", "###"],
        max_tokens=64,
        temperature=0.2,
        top_p=1,
    )
    assert out["stop_sequences"] == ["\n\nHuman:", "###"]
    assert out["max_tokens"] == 64
    assert out["temperature"] == 0.2
    assert "top_p" not in out  # newer Claude models refuse temperature and top_p together


def test_default_max_tokens_is_configurable() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert openai_to_anthropic(body, MODEL, default_max_tokens=1000)["max_tokens"] == 1000


# --- whole reply ----------------------------------------------------------------------------


REPLY: dict[str, Any] = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "thinking", "thinking": "Two cities.", "signature": "EqQB"},
        {"type": "text", "text": "Checking "},
        {"type": "text", "text": "both."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"location": "Oslo"},
        },
        {
            "type": "tool_use",
            "id": "toolu_02",
            "name": "get_weather",
            "input": {"location": "Paris"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 40,
    },
}


def test_a_reply_becomes_text_tool_calls_finish_reason_usage_and_model() -> None:
    text, tool_calls, finish, usage, model = anthropic_to_completion(REPLY)
    assert text == "Checking both."  # the thinking block is not reply text
    assert tool_calls == [
        {
            "id": "toolu_01",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Oslo"}'},
        },
        {
            "id": "toolu_02",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
        },
    ]
    assert finish == "tool_calls"
    # Cached and cache-writing tokens are still prompt tokens the client sent; what the cache
    # read and wrote is kept beside them for the client.
    assert usage == {
        "prompt_tokens": 2112,
        "completion_tokens": 40,
        "total_tokens": 2152,
        "cached_tokens": 2000,
        "cache_creation_tokens": 100,
    }
    assert model == "claude-sonnet-4-5-20250929"


def test_a_replys_tool_calls_feed_back_into_the_next_request_unchanged() -> None:
    reply = anthropic_to_completion(REPLY)
    follow_up = translate(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": reply.text, "tool_calls": reply.tool_calls},
        ]
    )
    tool_uses = [b for b in follow_up["messages"][1]["content"] if b["type"] == "tool_use"]
    originals = [b for b in REPLY["content"] if b["type"] == "tool_use"]
    assert tool_uses == originals


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("some_future_reason", "stop"),
        (None, None),
    ],
)
def test_stop_reasons_become_finish_reasons(stop_reason: str | None, expected: str | None) -> None:
    reply = {"content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason}
    result = anthropic_to_completion(reply)
    assert result.finish_reason == expected
    assert result.tool_calls is None
    assert result.usage == {}


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
        ("some_future_reason", "end_turn"),
    ],
)
def test_finish_reasons_become_stop_reasons(finish: str | None, stop: str) -> None:
    assert stop_reason(finish) == stop


def test_every_reason_survives_the_round_trip_it_names() -> None:
    # The inverse is derived from the same rows, so a client that sends back what it got
    # keeps the meaning, whichever side the reply came from.
    for finish in ("stop", "length", "tool_calls", "content_filter"):
        assert finish_reason(stop_reason(finish)) == finish
    for stop in ("end_turn", "max_tokens", "tool_use", "refusal"):
        assert stop_reason(finish_reason(stop)) == stop


# --- the one max_tokens rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_completion_tokens": 200, "max_tokens": 100}, 200),
        ({"max_tokens": 100, "max_completion_tokens": 200}, 200),
        ({"max_completion_tokens": 0, "max_tokens": 100}, 0),
        ({"max_completion_tokens": None, "max_tokens": 100}, 100),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({}, None),
    ],
)
def test_max_completion_tokens_supersedes_max_tokens_everywhere(
    fields: dict[str, Any], expected: int | None
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **fields}
    assert requested_max_tokens(body) == expected
    # The planner reserves exactly the output the Anthropic upstream is asked for.
    sent = openai_to_anthropic(body, MODEL, default_max_tokens=4096)["max_tokens"]
    assert sent == (4096 if expected is None else expected)
    assert output_allowance(body) == (expected or 0)


@pytest.mark.parametrize("limit", [True, "100", -5, 1.5])
def test_an_unusable_limit_reserves_no_output(limit: Any) -> None:
    assert output_allowance({"max_completion_tokens": limit, "max_tokens": 100}) == 0


# --- stream ---------------------------------------------------------------------------------


def event(kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **data}


def feed_all(
    translator: AnthropicStreamTranslator, events: list[tuple[str, dict[str, Any]]]
) -> list[Delta]:
    deltas = [translator.feed(name, data) for name, data in events]
    return [d for d in deltas if d is not None]


def text_block(index: int, *texts: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        event("content_block_start", index=index, content_block={"type": "text", "text": ""}),
        *(
            event("content_block_delta", index=index, delta={"type": "text_delta", "text": t})
            for t in texts
        ),
        event("content_block_stop", index=index),
    ]


def tool_block(
    index: int, tool_id: str, name: str, *fragments: str, kind: str = "tool_use"
) -> list[tuple[str, dict[str, Any]]]:
    return [
        event(
            "content_block_start",
            index=index,
            content_block={"type": kind, "id": tool_id, "name": name, "input": {}},
        ),
        *(
            event(
                "content_block_delta",
                index=index,
                delta={"type": "input_json_delta", "partial_json": f},
            )
            for f in fragments
        ),
        event("content_block_stop", index=index),
    ]


def test_stream_tool_calls_are_numbered_among_tool_calls_only() -> None:
    translator = AnthropicStreamTranslator("fallback-model")
    deltas = feed_all(
        translator,
        [
            event(
                "message_start",
                message={
                    "model": "claude-haiku-4-5",
                    "content": [],
                    "usage": {
                        "input_tokens": 849,
                        "cache_read_input_tokens": 1000,
                        "output_tokens": 1,
                    },
                },
            ),
            event(
                "content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}
            ),
            event(
                "content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "hmm"}
            ),
            event("content_block_stop", index=0),
            *text_block(1, "Both", " cities."),
            *tool_block(2, "toolu_a", "get_weather", "", '{"location":', ' "Oslo"}'),
            event("ping"),
            *tool_block(3, "srvtoolu_x", "web_search", '{"query": "x"}', kind="server_tool_use"),
            *tool_block(4, "toolu_b", "get_weather", '{"location": "Paris"}'),
            event("some_new_event", detail=1),
            event(
                "message_delta",
                delta={"stop_reason": "tool_use", "stop_sequence": None},
                usage={"output_tokens": 60},
            ),
            event("message_stop"),
        ],
    )
    assert "".join(d.text for d in deltas) == "Both cities."
    tool_deltas = [c for d in deltas for c in d.tool_calls or ()]
    assert tool_deltas[0] == {
        "index": 0,
        "id": "toolu_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert tool_deltas[1] == {"index": 0, "function": {"arguments": '{"location":'}}
    merged = merge_tool_calls(tool_deltas)
    assert [(c["id"], msgspec.json.decode(c["function"]["arguments"])) for c in merged] == [
        ("toolu_a", {"location": "Oslo"}),
        ("toolu_b", {"location": "Paris"}),  # index 1: the server tool did not count
    ]
    assert deltas[-1] == Delta(finish_reason="tool_calls")
    assert translator.done
    assert translator.model == "claude-haiku-4-5"
    assert translator.finish_reason == "tool_calls"
    assert translator.usage == {
        "prompt_tokens": 1849,
        "completion_tokens": 60,
        "total_tokens": 1909,
        "cached_tokens": 1000,
    }


def test_stream_usage_takes_the_latest_cumulative_counts() -> None:
    translator = AnthropicStreamTranslator()
    feed_all(
        translator,
        [
            event(
                "message_start",
                message={"model": "m", "usage": {"input_tokens": 5, "output_tokens": 1}},
            ),
            event(
                "message_delta",
                delta={"stop_reason": "max_tokens"},
                usage={"input_tokens": 7, "output_tokens": 9},
            ),
        ],
    )
    assert translator.usage == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    assert translator.finish_reason == "length"
    assert not translator.done


def test_stream_error_event_raises_a_classified_failure_without_the_key() -> None:
    key = "sk-ant-api03-canary-Zk4Qm8Rt2Vw6Xy0Ab3Cd5Ef7Gh9"
    translator = AnthropicStreamTranslator(key=key, clock=lambda: 1_700_000_000.0)
    assert translator.feed(*text_block(0, "Hi")[1]) == Delta(text="Hi")
    with pytest.raises(UpstreamFailure) as caught:
        translator.feed(
            "error",
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": f"Overloaded ({key})"},
            },
        )
    failure = caught.value.failure
    assert failure.cls is FailureClass.TARGET_DOWN
    assert failure.status is None
    assert key not in str(caught.value) and key[:20] not in repr(failure)


def test_a_mid_stream_rate_limit_error_keeps_its_class() -> None:
    translator = AnthropicStreamTranslator()
    with pytest.raises(UpstreamFailure) as caught:
        translator.feed(
            "error",
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        )
    assert caught.value.failure.cls is FailureClass.RATE_LIMITED

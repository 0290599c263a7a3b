"""The Responses API's pieces without a daemon: the input read into chat, and the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routerd.fronts.http.responses_input import parse_responses
from routerd.fronts.http.responses_store import ResponseStore
from routerd.fronts.http.wire import ShapeError


def parse(**body: object) -> tuple[list[dict[str, object]], dict[str, object]]:
    request = parse_responses(json.dumps({"model": "r", **body}).encode())
    chat = request.chat_body([])
    messages = chat.pop("messages")
    assert isinstance(messages, list)
    return messages, chat


def test_items_become_chat_messages_in_order() -> None:
    messages, chat = parse(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "look"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "role": "user",
                "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}],
            },
        ],
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "f"},
        max_output_tokens=99,
        text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
        metadata={"k": "v"},
    )
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "look"}]},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
        },
    ]
    assert chat == {
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "max_tokens": 99,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object"}},
        },
    }


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"input": "x", "tools": [{"type": "file_search"}, {"type": "code_interpreter"}]},
            "code_interpreter, file_search",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input_file",
        ),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_routerd_cannot_do_is_a_clear_400(body: dict[str, object], named: str) -> None:
    with pytest.raises(ShapeError, match=named):
        parse_responses(json.dumps({"model": "r", **body}).encode())


def test_the_store_is_bounded_by_count_bytes_and_age(tmp_path: Path) -> None:
    now = [1000.0]
    store = ResponseStore(max_entries=3, max_bytes=10_000, ttl_s=60, clock=lambda: now[0])
    for n in range(4):
        store.put(f"r{n}", f"r{n - 1}" if n else None, [{"role": "user", "content": f"m{n}"}], {})
    assert len(store) == 3 and store.get("r0") is None
    # The chain back to r0 is broken: a history that cannot be whole is none at all.
    assert store.history("r3") is None
    store.put("a", None, [{"role": "user", "content": "x"}], {"id": "a"})
    store.put("b", "a", [{"role": "assistant", "content": "y"}], {"id": "b"})
    assert store.history("b") == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
    store.put("big", None, [{"role": "user", "content": "z" * 20_000}], {})
    assert store.get("big") is None  # larger than the whole store: not kept
    now[0] += 61
    assert store.get("a") is None and store.history("b") is None
    path = tmp_path / "responses"
    now[0] = 1000.0
    store.put("c", None, [], {"id": "c"})
    path.write_bytes(store.dump())
    again = ResponseStore(max_entries=3, clock=lambda: now[0])
    assert again.load(path) >= 1 and again.get("c") is not None
    path.write_bytes(b"not a store")
    assert ResponseStore().load(path) == 0  # damaged: ignored, not fatal

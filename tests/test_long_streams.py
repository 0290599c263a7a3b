"""A long stream's pieces are joined once, not added up one by one.

Adding each piece to the string so far copies that string per piece: a tool call that writes
a 320 kB file in 4-character pieces cost 0.3 s of the event loop that way (1.1 s for the
Responses front's text), 16 ms and 87 ms joined. The pieces here are a ``str`` subclass
that counts every ``text + piece``, so the tests see the copying itself, not a timing.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import msgspec
import pytest

from routerd.core.calls import Delta, Reply
from routerd.dispatch.attempt import ToolCalls, merge_tool_calls
from routerd.fronts.http import responses_shape
from routerd.fronts.http.responses_shape import EventEncoder

PIECES = 2_000


class Piece(str):
    """A streamed piece that counts the concatenations it takes part in."""

    added: ClassVar[int] = 0

    def __radd__(self, other: str) -> str:
        Piece.added += 1
        return str(other) + str(self)


def _pieces(prefix: str) -> list[Piece]:
    return [Piece(f"{prefix}{n:04d}") for n in range(PIECES)]


def test_tool_call_arguments_are_joined_once() -> None:
    Piece.added = 0
    merged = ToolCalls()
    merged.add([{"index": 0, "id": "c1", "function": {"name": "write_file", "arguments": ""}}])
    arguments = _pieces("a")
    for piece in arguments:
        merged.add([{"index": 0, "function": {"arguments": piece}}])
    merged.add([{"index": 1, "id": "c2", "function": {"name": Piece("look"), "arguments": "{}"}}])
    merged.add([{"index": 1, "function": {"name": Piece("up")}}])
    assert merged.calls() == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "write_file", "arguments": "".join(arguments)},
        },
        {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
    ]
    assert Piece.added == 0


def test_merge_tool_calls_keeps_the_order_of_indexes_and_late_ids() -> None:
    deltas: list[dict[str, Any]] = [
        {"index": 1, "function": {"name": "b", "arguments": "{"}},
        {"index": 0, "id": "c0", "function": {"name": "a", "arguments": "{}"}},
        {"index": 1, "id": "c1", "function": {"arguments": "}"}},
    ]
    assert merge_tool_calls(deltas) == [
        {"id": "c0", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"id": "c1", "type": "function", "function": {"name": "b", "arguments": "{}"}},
    ]


def test_the_responses_stream_joins_text_and_arguments_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encode = msgspec.json.Encoder(enc_hook=str).encode  # msgspec takes no str subclass

    def sse(data: object, event: str | None = None) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (str(event).encode(), encode(data))

    monkeypatch.setattr(responses_shape, "sse", sse)
    Piece.added = 0
    finals: list[dict[str, Any]] = []
    encoder = EventEncoder("resp_1", "main", {}, on_final=lambda reply, final: finals.append(final))
    text, arguments = _pieces("t"), _pieces("a")
    stream = b"".join(encoder.delta(Delta(text=piece)) for piece in text)
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    stream += encoder.delta(Delta(tool_calls=[call]))
    for piece in arguments:
        stream += encoder.delta(Delta(tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
    reply = Reply(
        text="".join(text),
        model="m1",
        provider="p",
        credential="k",
        target="p/m1",
        usage={"prompt_tokens": 3, "completion_tokens": 4},
        attempts=[],
        finish_reason="tool_calls",
        tool_calls=None,
    )
    stream += encoder.closing(reply)
    assert Piece.added == 0
    events = [
        json.loads(line.removeprefix("data: "))
        for line in stream.decode().split("\n")
        if line.startswith("data: ")
    ]
    done = {e["type"]: e for e in events if e["type"].endswith(".done")}
    assert done["response.output_text.done"]["text"] == "".join(text)
    assert done["response.function_call_arguments.done"]["arguments"] == "".join(arguments)
    output = finals[0]["output"]
    assert output[0]["content"][0]["text"] == "".join(text)
    assert output[1]["arguments"] == "".join(arguments)

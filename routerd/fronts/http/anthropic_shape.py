"""Anthropic's Messages shape: the request read, the reply and its event stream written.

The request is decoded here and translated by routerd.translate.anthropic_in. The
dispatcher's replies are OpenAI-shaped (text, tool calls, finish reason, usage); here
they become a ``message`` object, or the exact event sequence the Messages API streams:
message_start, then per content block content_block_start, content_block_delta
(text_delta or input_json_delta) and content_block_stop, then message_delta (stop reason,
usage) and message_stop.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from routerd.core.calls import Delta, Reply
from routerd.fronts.http.errors import HttpError
from routerd.fronts.http.wire import ShapeError, decode_body, encode, sse, trailer, unique_id
from routerd.translate import (
    MessagesRequest,
    TranslationError,
    anthropic_usage,
    stop_reason,
    to_openai,
    tool_input,
)

log = structlog.get_logger("routerd.front")

# A text block's content_block_delta, as sse() writes it: (the block's index, the text's JSON).
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":%s}}\n\n'
)


def parse_messages(raw: bytes) -> MessagesRequest:
    """Decode and check a Messages body; raises ShapeError with the offending path."""
    data = decode_body(raw, "the request body is not valid JSON")
    try:
        request = msgspec.convert(data, MessagesRequest)
    except msgspec.ValidationError as exc:
        raise ShapeError(str(exc)) from None
    if not request.messages:
        raise ShapeError("messages: at least one message is required")
    return request


def chat_body(request: MessagesRequest) -> dict[str, Any]:
    """The OpenAI chat body for a Messages request.

    Raises ShapeError for what the OpenAI shape cannot hold.
    """
    try:
        return to_openai(request)
    except TranslationError as exc:
        raise ShapeError(str(exc)) from None


def _tool_input(arguments: str, name: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's ``input`` must be."""
    value = tool_input(arguments)
    if arguments and value == {"_raw": arguments}:
        # The model emitted something that is not a JSON object: worth a line in the log.
        log.warning("tool_arguments_not_an_object", tool=name)
    return value


def message(reply: Reply) -> bytes:
    """The ``message`` object for a finished reply."""
    content: list[dict[str, Any]] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for call in reply.tool_calls or []:
        function = call.get("function") or {}
        name = str(function.get("name", ""))
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _tool_id(),
                "name": name,
                "input": _tool_input(str(function.get("arguments") or ""), name),
            }
        )
    return encode(
        {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": stop_reason(reply.finish_reason),
            "stop_sequence": None,
            "usage": anthropic_usage(reply.usage),
        }
    )


class EventEncoder:
    """Writes one reply as the Messages event stream, block by block as the Deltas arrive.

    Text opens a text block; each OpenAI tool-call delta that brings an id (or the first
    for its index) opens a tool_use block, and argument pieces become input_json_delta on
    that call's block. A block closes when the next one opens.
    """

    def __init__(self, model: str, input_tokens: int) -> None:
        self.model = model
        # The prompt's size is known only from routerd's estimate until the reply's usage.
        self.input_tokens = input_tokens
        self._next = 0
        self._open: int | None = None
        self._open_kind: str | None = None
        self._tool_blocks: dict[int, int] = {}
        self._tool_ids: dict[int, str] = {}

    def opening(self) -> bytes:
        """message_start (with an empty message) and a ping, as the API begins its streams."""
        start = {
            "type": "message_start",
            "message": {
                "id": _message_id(),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
            },
        }
        return sse(start, "message_start") + sse({"type": "ping"}, "ping")

    def delta(self, delta: Delta) -> bytes:
        """The events for one upstream Delta; nothing for a delta with only a finish."""
        if delta.model:
            self.model = delta.model  # message_start, sent after the first delta, names it
        out = b""
        if delta.text:
            if self._open_kind != "text":
                out += self._start({"type": "text", "text": ""}, "text")
            out += _TEXT_DELTA % (self._open, encode(delta.text))  # per token: no dict
        for call in delta.tool_calls or []:
            out += self._tool_delta(call)
        return out

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        block = self._tool_blocks.get(index)
        call_id = call.get("id")
        # Some compatible servers repeat the id on every delta of a call: only a new id (or
        # the first delta of an index) opens a block.
        if block is None or (call_id and call_id != self._tool_ids.get(index)):
            block = self._next
            self._tool_blocks[index] = block
            self._tool_ids[index] = call_id or _tool_id()
            out += self._start(
                {
                    "type": "tool_use",
                    "id": self._tool_ids[index],
                    "name": function.get("name") or "",
                    "input": {},
                },
                "tool_use",
            )
        arguments = function.get("arguments")
        if arguments:
            out += self._delta(block, {"type": "input_json_delta", "partial_json": arguments})
        return out

    def _start(self, block: dict[str, Any], kind: str) -> bytes:
        out = self._stop()
        self._open, self._open_kind = self._next, kind
        self._next += 1
        event = {"type": "content_block_start", "index": self._open, "content_block": block}
        return out + sse(event, "content_block_start")

    def _delta(self, index: int | None, delta: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        return sse(event, "content_block_delta")

    def _stop(self) -> bytes:
        if self._open is None:
            return b""
        event = {"type": "content_block_stop", "index": self._open}
        self._open = self._open_kind = None
        return sse(event, "content_block_stop")

    def closing(self, reply: Reply) -> bytes:
        """Close the last block, then message_delta (stop reason, usage) and message_stop."""
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(reply.finish_reason), "stop_sequence": None},
            "usage": anthropic_usage(reply.usage) if reply.usage else {"output_tokens": 0},
        }
        return (
            self._stop()
            + sse(end, "message_delta")
            + sse({"type": "message_stop"}, "message_stop")
            + trailer(reply)
        )

    def error(self, error: HttpError) -> bytes:
        """A failure after the stream began: Anthropic's ``error`` event."""
        return sse(error.body, "error")


def model_list(routes: list[str], targets: list[tuple[str, str]]) -> bytes:
    """GET /v1/models as the Anthropic SDK's models.list() reads it."""
    names = routes + [name for name, _ in targets]
    data = [
        {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
        for name in names
    ]
    return encode(
        {
            "data": data,
            "has_more": False,
            "first_id": names[0] if names else None,
            "last_id": names[-1] if names else None,
        }
    )


def _message_id() -> str:
    return f"msg_{unique_id()}"


def _tool_id() -> str:
    return f"toolu_{unique_id()}"

"""Anthropic replies in OpenAI chat shape: the whole message, or the stream event by event.

Both share one vocabulary: stop reasons become finish reasons, usage becomes OpenAI usage
(cache reads and writes count as prompt tokens), ``tool_use`` blocks become OpenAI tool
calls. Thinking and server-tool blocks are not part of an OpenAI reply and are left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from routerd.classify import classify
from routerd.outcome import UpstreamFailure
from routerd.upstream.base import Delta

__all__ = [
    "AnthropicReply",
    "AnthropicStreamTranslator",
    "anthropic_to_completion",
    "finish_reason",
]

# Anthropic's stop reasons in OpenAI's words; anything newer reads as a plain stop.
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_encode = msgspec.json.Encoder().encode


class AnthropicReply(NamedTuple):
    """A whole Anthropic reply in OpenAI terms."""

    text: str
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    usage: dict[str, int]
    model: str | None


def finish_reason(stop_reason: object) -> str | None:
    """OpenAI's finish_reason for an Anthropic stop_reason (None while not stopped)."""
    if not isinstance(stop_reason, str) or not stop_reason:
        return None
    return _FINISH.get(stop_reason, "stop")


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if type(value) is int else 0


def _usage(usage: object) -> dict[str, int]:
    """OpenAI usage; cached and cache-writing input tokens are prompt tokens too."""
    if not isinstance(usage, dict) or not usage:
        return {}
    prompt = sum(
        _count(usage, name)
        for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    completion = _count(usage, "output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    tool_input = block.get("input")
    return {
        "id": str(block.get("id") or ""),
        "type": "function",
        "function": {
            "name": str(block.get("name") or ""),
            "arguments": _encode(tool_input if tool_input is not None else {}).decode(),
        },
    }


def anthropic_to_completion(reply: dict[str, Any]) -> AnthropicReply:
    """Text, OpenAI tool calls, finish_reason, usage and model of an Anthropic message."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in reply.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block))
    model = reply.get("model")
    return AnthropicReply(
        text="".join(texts),
        tool_calls=calls or None,
        finish_reason=finish_reason(reply.get("stop_reason")),
        usage=_usage(reply.get("usage")),
        model=model if isinstance(model, str) and model else None,
    )


class AnthropicStreamTranslator:
    """Turns Anthropic stream events into OpenAI-style Deltas, one event at a time.

    ``model``, ``usage`` and ``finish_reason`` hold the summary so far; ``done`` is set by
    ``message_stop``. An ``error`` event raises UpstreamFailure, classified from its body
    (scrubbed of ``key``) as a failure inside an accepted stream.
    """

    __slots__ = ("_clock", "_counts", "_key", "_tools", "done", "finish_reason", "model", "usage")

    def __init__(
        self, model: str = "", *, key: str = "", clock: Callable[[], float] = time.time
    ) -> None:
        self.model = model
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.done = False
        self._key = key
        self._clock = clock
        self._counts: dict[str, Any] = {}
        # Anthropic numbers every content block; OpenAI numbers only the tool calls.
        self._tools: dict[int, int] = {}

    def feed(self, event: str, data: dict[str, Any]) -> Delta | None:
        """Take one event (its SSE name and decoded data); return the Delta it makes, if any."""
        if event == "content_block_delta":
            return self._block_delta(data)
        if event == "content_block_start":
            return self._block_start(data)
        if event == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str) and message["model"]:
                    self.model = message["model"]
                self._count(message.get("usage"))
            return None
        if event == "message_delta":
            self._count(data.get("usage"))
            delta = data.get("delta")
            finish = finish_reason(delta.get("stop_reason")) if isinstance(delta, dict) else None
            if finish is None:
                return None
            self.finish_reason = finish
            return Delta(finish_reason=finish)
        if event == "message_stop":
            self.done = True
        elif event == "error":
            raise UpstreamFailure(classify(None, None, data, key=self._key, now=self._clock()))
        # content_block_stop, ping, and event types newer than this code say nothing.
        return None

    def _block_start(self, data: dict[str, Any]) -> Delta | None:
        block = data.get("content_block")
        if not isinstance(block, dict):
            return None
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return Delta(text=text) if isinstance(text, str) and text else None
        if kind != "tool_use" or not isinstance(data.get("index"), int):
            return None  # thinking, server tools and their results are not OpenAI output
        index = self._tools[data["index"]] = len(self._tools)
        call = _tool_call(block)
        # The input arrives as input_json_delta fragments; the opening {} is a placeholder.
        if not block.get("input"):
            call["function"]["arguments"] = ""
        return Delta(tool_calls=[{"index": index, **call}])

    def _block_delta(self, data: dict[str, Any]) -> Delta | None:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return None
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return Delta(text=text) if isinstance(text, str) and text else None
        if kind == "input_json_delta":
            block = data.get("index")
            index = self._tools.get(block) if isinstance(block, int) else None
            fragment = delta.get("partial_json")
            if index is None or not isinstance(fragment, str) or not fragment:
                return None  # a server tool's input, or the empty opening fragment
            return Delta(tool_calls=[{"index": index, "function": {"arguments": fragment}}])
        return None  # thinking, signature and citation deltas

    def _count(self, usage: object) -> None:
        # message_delta repeats the counts cumulatively, so the latest value of each wins.
        if isinstance(usage, dict):
            self._counts.update(
                (name, value) for name, value in usage.items() if type(value) is int
            )
            self.usage = _usage(self._counts)

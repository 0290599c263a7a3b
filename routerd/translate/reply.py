"""Whole replies and their tool calls, from one API's words into the other's.

Anthropic's message becomes OpenAI's text, tool calls, finish reason and usage; an OpenAI
tool call's arguments become the object Anthropic's ``tool_use.input`` must be. Thinking and
server-tool blocks are not part of an OpenAI reply and are left out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from routerd.translate.tables import finish_reason, openai_usage

__all__ = ["AnthropicReply", "anthropic_to_completion", "openai_tool_call", "tool_input"]

_encode = msgspec.json.Encoder().encode


class AnthropicReply(NamedTuple):
    """A whole Anthropic reply in OpenAI terms."""

    text: str
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    usage: dict[str, int]
    model: str | None


def openai_tool_call(block: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI tool call for an Anthropic ``tool_use`` block (its input as JSON text)."""
    tool_input = block.get("input")
    return {
        "id": str(block.get("id") or ""),
        "type": "function",
        "function": {
            "name": str(block.get("name") or ""),
            "arguments": _encode(tool_input if tool_input is not None else {}).decode(),
        },
    }


def tool_input(arguments: object) -> dict[str, Any]:
    """An OpenAI tool call's ``arguments`` as the object Anthropic's ``input`` must be.

    Models do emit broken or non-object arguments, and the conversation must still go on,
    so such text is kept as ``{"_raw": text}``, where the model can see it.
    """
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}  # a tool without parameters is often called with ""
    try:
        value = msgspec.json.decode(str(arguments))
    except msgspec.DecodeError:
        value = None
    return value if isinstance(value, dict) else {"_raw": str(arguments)}


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
            calls.append(openai_tool_call(block))
    model = reply.get("model")
    return AnthropicReply(
        text="".join(texts),
        tool_calls=calls or None,
        finish_reason=finish_reason(reply.get("stop_reason")),
        usage=openai_usage(reply.get("usage")),
        model=model if isinstance(model, str) and model else None,
    )

"""Anthropic Messages requests rewritten in the OpenAI chat shape the dispatcher takes (pure).

What the OpenAI shape cannot hold raises TranslationError naming the offending path; the
front answers it as a bad request.

- ``system`` (a string or text blocks) becomes the first, system, message.
- User turns: ``text`` and ``image`` blocks become content parts; ``document`` blocks with
  base64 data become ``file`` parts; each ``tool_result`` becomes a ``tool`` message, placed
  before the rest of its turn as OpenAI requires (images inside a tool result follow in a
  user message, since a tool message holds only text).
- Assistant turns: text blocks become the content, ``tool_use`` blocks ``tool_calls``.
- ``thinking`` and ``redacted_thinking`` blocks, ``thinking``, ``top_k`` and
  ``service_tier`` are dropped: the OpenAI shape has no place for them.
- ``tools`` become function tools; tools of Anthropic's own types (web search, ...) and
  block types this module does not know pass through untouched, so an Anthropic upstream
  still receives them (routerd.translate.request keeps them too).
- ``tool_choice`` auto/any/tool/none and ``disable_parallel_tool_use``,
  ``stop_sequences``, ``max_tokens``, ``temperature``, ``top_p`` and
  ``metadata.user_id`` map to their OpenAI names.
- ``cache_control`` on text blocks is kept, so prompt caching survives the round trip to an
  Anthropic upstream.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from routerd.translate.errors import TranslationError
from routerd.translate.tables import OPENAI_TOOL_CHOICE

__all__ = ["MessagesRequest", "to_openai"]

_encode = msgspec.json.Encoder().encode


class _Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(msgspec.Struct):
    """The fields of a Messages request routerd reads; unknown fields are ignored."""

    model: str
    messages: list[_Message]
    max_tokens: int | None = None
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def to_openai(request: MessagesRequest) -> dict[str, Any]:
    """The OpenAI chat body the dispatcher takes for a Messages request."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _system(request.system)})
    for index, message in enumerate(request.messages):
        where = f"messages.{index}"
        if message.role == "user":
            messages.extend(_user(message.content, where))
        else:
            messages.append(_assistant(message.content, where))
    body: dict[str, Any] = {"messages": messages}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    user = (request.metadata or {}).get("user_id")
    if isinstance(user, str) and user:
        body["user"] = user
    if request.tools:
        body["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(request.tools)]
        if request.tool_choice is not None:
            _tool_choice(request.tool_choice, body)
    return body


def _system(system: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(system, str):
        return system
    return [_text_part(block, "system") for block in system]


def _text_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    text = block.get("text")
    if block.get("type") != "text" or not isinstance(text, str):
        raise TranslationError(f"{where}: expected a text block")
    part: dict[str, Any] = {"type": "text", "text": text}
    if "cache_control" in block:
        part["cache_control"] = block["cache_control"]
    return part


def _user(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One user turn: its tool results as tool messages first, then the rest as one message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        here = f"{where}.content.{index}"
        kind = _string(block, "type", here)
        if kind == "tool_result":
            text, images = _tool_result(block, here)
            tools.append({"role": "tool", "tool_call_id": _string(block, "tool_use_id", here)})
            tools[-1]["content"] = text
            parts.extend(images)
        elif kind == "tool_use":
            raise TranslationError(f"{here}: tool_use blocks belong in assistant messages")
        elif kind not in _DROPPED_BLOCKS:
            parts.append(_part(block, here))
    if parts:
        return [*tools, {"role": "user", "content": parts}]
    return tools


def _part(block: dict[str, Any], where: str) -> dict[str, Any]:
    kind = block.get("type")
    if kind == "text":
        return _text_part(block, where)
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _source_url(block, where)}}
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data", ""))}
        title = block.get("title")
        return {
            "type": "file",
            "file": {
                "filename": title if isinstance(title, str) and title else "document.pdf",
                "file_data": _source_url(block, where),
            },
        }
    return block  # Anthropic-native or newer block types, passed on as sent


def _source_url(block: dict[str, Any], where: str) -> str:
    """A base64 source as a data URL, or a url source's URL."""
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64":
            media_type, data = source.get("media_type"), source.get("data")
            if isinstance(media_type, str) and isinstance(data, str):
                return f"data:{media_type};base64,{data}"
        elif source.get("type") == "url" and isinstance(source.get("url"), str):
            url: str = source["url"]
            return url
    raise TranslationError(
        f"{where}.source: expected a base64 or url source (file ids cannot be routed)"
    )


def _tool_result(block: dict[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text, and its images as parts for the user message that follows."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content: expected a string or a list of blocks")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for index, item in enumerate(content):
        if not isinstance(item, dict):
            raise TranslationError(f"{where}.content.{index}: expected a block")
        if item.get("type") == "text":
            texts.append(str(item.get("text", "")))
        elif item.get("type") == "image":
            images.append(_part(item, f"{where}.content.{index}"))
    return "\n".join(texts), images


def _assistant(content: str | list[dict[str, Any]], where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        here = f"{where}.content.{index}"
        kind = _string(block, "type", here)
        if kind == "tool_use":
            calls.append(
                {
                    "id": _string(block, "id", here),
                    "type": "function",
                    "function": {
                        "name": _string(block, "name", here),
                        "arguments": _encode(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind == "text":
            parts.append(_text_part(block, here))
        elif kind not in _DROPPED_BLOCKS:
            parts.append(block)
    message: dict[str, Any] = {"role": "assistant", "content": _collapse(parts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """Plain text blocks as one string, as most OpenAI-compatible servers expect."""
    if not parts:
        return None
    if all(p.keys() == {"type", "text"} and p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom"):
        return tool  # a tool of Anthropic's own (web search, bash, ...), as sent
    function: dict[str, Any] = {"name": _string(tool, "name", where)}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    schema = tool.get("input_schema")
    function["parameters"] = schema if isinstance(schema, dict) else {"type": "object"}
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any], body: dict[str, Any]) -> None:
    kind = choice.get("type")
    if isinstance(kind, str) and kind in OPENAI_TOOL_CHOICE:
        body["tool_choice"] = OPENAI_TOOL_CHOICE[kind]
    elif kind == "tool":
        name = _string(choice, "name", "tool_choice")
        body["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise TranslationError(f"tool_choice.type: expected auto, any, tool or none, got {kind!r}")
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False


def _string(block: dict[str, Any], field: str, where: str) -> str:
    value = block.get(field)
    if not isinstance(value, str) or not value:
        raise TranslationError(f"{where}.{field}: expected a non-empty string")
    return value

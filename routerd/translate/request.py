"""OpenAI chat-completions requests rewritten as Anthropic Messages requests (pure).

``openai_to_anthropic`` keeps only what Anthropic understands, since it refuses unknown fields:

- ``model`` (the target's), ``max_tokens`` (routerd.tokens.requested_max_tokens, else a
  default: Anthropic requires it), ``temperature`` (clamped to
  Anthropic's 0..1), ``top_p`` (left out when 1, which truncates nothing, because newer
  Claude models refuse ``temperature`` and ``top_p`` together), ``stop`` ->
  ``stop_sequences``, ``stream``, ``user`` (else ``safety_identifier``) ->
  ``metadata.user_id``, ``tools``, ``tool_choice``, and ``parallel_tool_calls: false`` ->
  ``disable_parallel_tool_use``.
- Everything else is dropped, notably the OpenAI-only ``n``, ``presence_penalty``,
  ``frequency_penalty``, ``logit_bias``, ``logprobs``, ``top_logprobs``, ``seed``,
  ``response_format``, ``reasoning_effort``, ``service_tier``, ``store``, ``metadata``,
  ``modalities``, ``audio``, ``prediction``, ``stream_options``, ``web_search_options``,
  ``prompt_cache_key`` and the legacy ``functions``/``function_call``.

Messages: ``system`` and ``developer`` messages, wherever they stand, and a top-level
``system`` become Anthropic's top-level ``system``; ``tool`` messages become ``tool_result``
blocks in a user turn; assistant ``tool_calls`` become ``tool_use`` blocks; consecutive
turns of one role are merged, since Anthropic requires alternation. Content parts: ``text``
(its ``cache_control`` kept), ``image_url`` (a base64 data URL or an http(s) URL), ``file``
with a base64 data URL (a PDF becomes a ``document`` block), and any part type OpenAI does
not define, which passes through untouched so a client can send Anthropic-native blocks.
What Anthropic cannot express (audio, file ids, unknown roles) raises ``TranslationError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from routerd.core.tokens import requested_max_tokens
from routerd.translate.errors import TranslationError
from routerd.translate.reply import tool_input
from routerd.translate.tables import ANTHROPIC_TOOL_CHOICE

__all__ = ["DEFAULT_MAX_TOKENS", "openai_to_anthropic"]

DEFAULT_MAX_TOKENS = 4096

# Anthropic accepts only these characters in a tool_use id; ids minted by other providers
# (a conversation that started elsewhere in the chain) may carry others.
_TOOL_ID_JUNK = re.compile(r"[^a-zA-Z0-9_-]")
_ANTHROPIC_CHOICES = frozenset({*ANTHROPIC_TOOL_CHOICE.values(), "tool"})
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def openai_to_anthropic(
    body: dict[str, Any], model: str, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """The Anthropic Messages body for an OpenAI chat-completions ``body``, aimed at ``model``.

    ``body`` is not modified. Raises TranslationError for what Anthropic cannot express.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages must be a list")
    system: list[dict[str, Any]] = list(_system_blocks(body.get("system")))
    turns: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TranslationError(f"messages[{position}] is not an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_system_blocks(message.get("content")))
            continue
        if role == "user":
            blocks = [_part(part) for part in _parts(message.get("content"))]
        elif role == "assistant":
            blocks = [_part(part) for part in _parts(message.get("content"))]
            blocks.extend(_tool_use(call) for call in message.get("tool_calls") or ())
        elif role == "tool":
            role, blocks = "user", [_tool_result(message)]
        else:
            raise TranslationError(f"messages[{position}] has unsupported role {str(role)[:40]!r}")
        if not blocks:
            continue  # Anthropic refuses empty turns; an empty message says nothing anyway
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # Anthropic requires alternating roles
        else:
            turns.append({"role": role, "content": blocks})

    out: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens)}
    if system:
        out["system"] = _collapse(system)
    out["messages"] = [{"role": t["role"], "content": _finish_turn(t)} for t in turns]
    _sampling(body, out)
    _tools(body, out)
    return out


def _system_blocks(content: object) -> Iterable[dict[str, Any]]:
    for part in _parts(content):
        block = _part(part)
        if block.get("type") != "text":
            raise TranslationError("system content must be text")
        yield block


def _parts(content: object) -> list[Any]:
    """A message's content as a list of parts; empty text is dropped (Anthropic refuses it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return [
            part
            for part in content
            if not (isinstance(part, dict) and part.get("type") == "text" and not part.get("text"))
        ]
    raise TranslationError("message content must be a string or a list of parts")


def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise TranslationError("a content part must be an object")
    kind = part.get("type")
    if kind == "text":
        block: dict[str, Any] = {"type": "text", "text": str(part.get("text"))}
    elif kind == "refusal":
        block = {"type": "text", "text": str(part.get("refusal") or "")}
    elif kind == "image_url":
        image = part.get("image_url")
        block = _image(image.get("url") if isinstance(image, dict) else image)
    elif kind == "file":
        block = _file(part.get("file"))
    elif kind == "input_audio":
        raise TranslationError("Anthropic models take no audio input")
    else:
        return part  # an Anthropic-native block (image with source, document, ...) as sent
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _data_url(url: str) -> tuple[str, str]:
    """(media type, base64 data) of a ``data:`` URL."""
    header, comma, data = url[5:].partition(",")
    media_type, *params = header.split(";")
    if not comma or "base64" not in (p.strip().lower() for p in params) or not media_type:
        raise TranslationError("a data URL must name its media type and be base64")
    return media_type.strip().lower(), data


def _image(url: object) -> dict[str, Any]:
    if not isinstance(url, str):
        raise TranslationError("an image_url part needs a url")
    if url.startswith("data:"):
        media_type, data = _data_url(url)
        source = {"type": "base64", "media_type": media_type, "data": data}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("an image url must be a data URL or http(s)")


def _file(file: object) -> dict[str, Any]:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise TranslationError("a file part must carry file_data as a data URL (no file ids)")
    media_type, data = _data_url(data_url)
    kind = "image" if media_type.startswith("image/") else "document"
    return {"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}


def _tool_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TranslationError("a tool call needs an id")
    return _TOOL_ID_JUNK.sub("_", value)


def _tool_use(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TranslationError("a tool call needs a function name")
    return {
        "type": "tool_use",
        "id": _tool_id(call.get("id")),
        "name": function["name"],
        "input": tool_input(function.get("arguments")),
    }


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _tool_id(message.get("tool_call_id")),
    }
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    if content:
        block["content"] = str(content)
    return block


def _finish_turn(turn: dict[str, Any]) -> str | list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = turn["content"]
    if turn["role"] == "user":
        # Tool results must open the user turn that answers the tool calls.
        results = [b for b in blocks if b.get("type") == "tool_result"]
        if results and len(results) < len(blocks):
            blocks = results + [b for b in blocks if b.get("type") != "tool_result"]
    return _collapse(blocks)


def _collapse(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone plain text block as the bare string Anthropic also accepts."""
    if len(blocks) == 1 and blocks[0].keys() == {"type", "text"} and blocks[0]["type"] == "text":
        text: str = blocks[0]["text"]
        return text
    return blocks


def _max_tokens(body: dict[str, Any], default: int) -> Any:
    limit = requested_max_tokens(body)
    return default if limit is None else limit


def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    temperature = _number(body.get("temperature"))
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0.0), 1.0)  # OpenAI allows up to 2
    top_p = _number(body.get("top_p"))
    if top_p is not None and top_p < 1:
        out["top_p"] = top_p
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    stops = [s for s in stops if isinstance(s, str) and s]
    if stops:
        out["stop_sequences"] = stops
    if isinstance(body.get("stream"), bool):
        out["stream"] = body["stream"]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}


def _number(value: object) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return  # a tool_choice without tools means nothing, and Anthropic would refuse it
    converted: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            converted.append(tool)  # an Anthropic-native tool (web search, ...) as sent
            continue
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TranslationError("a function tool needs a name")
        entry: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            entry["description"] = function["description"]
        entry["input_schema"] = function.get("parameters") or _NO_PARAMETERS
        converted.append(entry)
    out["tools"] = converted
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _tool_choice(choice: object) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in ANTHROPIC_TOOL_CHOICE:
        # "none" keeps the tools: a history that holds tool calls must still declare them.
        return {"type": ANTHROPIC_TOOL_CHOICE[choice]}
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            function = choice.get("function")
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                return {"type": "tool", "name": function["name"]}
        elif choice.get("type") in _ANTHROPIC_CHOICES:
            return choice  # already in Anthropic's words
    raise TranslationError("unsupported tool_choice")

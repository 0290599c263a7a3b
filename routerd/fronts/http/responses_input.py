"""OpenAI's Responses API, the request side: a ``POST /v1/responses`` body read into the chat
body the dispatcher takes.

``input`` (a string, or items: messages with input_text / input_image / output_text parts,
``function_call`` and ``function_call_output``) becomes chat ``messages``;
``instructions`` a system message in front; function ``tools`` and ``tool_choice`` the chat
forms; ``max_output_tokens`` ``max_tokens``; ``text.format`` ``response_format``. Built-in
tools routerd cannot run (web search, file search, code interpreter, ...) are refused with a
400 naming them. What the reply must echo (instructions, tools, metadata, ...) is kept
beside the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routerd.fronts.http.openai_shape import json_object
from routerd.fronts.http.wire import ShapeError

# Passed to the upstream as they are: the same name and meaning in chat completions.
_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "prompt_cache_key")
# Other fields (metadata, reasoning, include, truncation, ...) shape routerd's own answer
# or have no chat meaning; they are not sent upstream.


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """One Responses request: what routes it, the chat body, and what its reply echoes."""

    route: str
    # This turn's messages (without instructions): what a later turn builds on.
    messages: list[dict[str, Any]]
    body: dict[str, Any]  # everything else for the chat body, messages added per turn
    stream: bool
    store: bool
    previous_response_id: str | None
    instructions: str | None
    echo: dict[str, Any] = field(default_factory=dict)

    def chat_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The chat body: instructions, the earlier turns' messages, then this turn's."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return {**self.body, "messages": [*system, *history, *self.messages]}


def parse_responses(raw: bytes) -> ResponsesRequest:
    """Read a Responses body; raises ShapeError with OpenAI-style wording."""
    data = json_object(raw)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ShapeError("Missing required parameter: 'model'.")
    messages = input_messages(data.get("input"))
    instructions = _optional_str(data, "instructions")
    previous = _optional_str(data, "previous_response_id")
    if not messages and previous is None:
        raise ShapeError("Missing required parameter: 'input'.")
    body: dict[str, Any] = {name: data[name] for name in _PASSED if data.get(name) is not None}
    tools = _tools(data.get("tools"))
    if tools:
        body["tools"] = tools
    choice = _tool_choice(data.get("tool_choice"))
    if choice is not None:
        body["tool_choice"] = choice
    limit = data.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise ShapeError("max_output_tokens must be a positive integer")
        body["max_tokens"] = limit
    response_format = _response_format(data.get("text"))
    if response_format is not None:
        body["response_format"] = response_format
    _refuse_unsupported(data)
    return ResponsesRequest(
        route=model,
        messages=messages,
        body=body,
        stream=bool(data.get("stream")),
        store=data.get("store") is not False,
        previous_response_id=previous,
        instructions=instructions,
        echo=_echo(data),
    )


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """Settings whose meaning routerd cannot keep are refused, not silently dropped."""
    for name, what in (
        ("conversation", "OpenAI's stored conversations; use previous_response_id"),
        ("prompt", "OpenAI's stored prompt templates"),
    ):
        if data.get(name) is not None:
            raise ShapeError(f"{name} is not supported by routerd ({what})")
    if data.get("background"):
        raise ShapeError("background responses are not supported by routerd")


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ShapeError(f"{name} must be a string")


def _echo(data: dict[str, Any]) -> dict[str, Any]:
    """The request's settings the response object repeats, with OpenAI's defaults."""
    metadata = data.get("metadata")
    return {
        "instructions": data.get("instructions"),
        "max_output_tokens": data.get("max_output_tokens"),
        "metadata": metadata if isinstance(metadata, dict) else {},
        "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "previous_response_id": data.get("previous_response_id"),
        "store": data.get("store") is not False,
        "temperature": data.get("temperature", 1.0),
        "text": data.get("text") or {"format": {"type": "text"}},
        "tool_choice": data.get("tool_choice", "auto"),
        "tools": data.get("tools") or [],
        "top_p": data.get("top_p", 1.0),
        "truncation": data.get("truncation") or "disabled",
        "user": data.get("user"),
    }


# ---- input items ----------------------------------------------------------------------


def input_messages(value: object) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; items are read in order."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ShapeError("input must be a string or an array of input items")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ShapeError(f"input[{index}] must be an object")
        _add_item(messages, item, index)
    return messages


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], index: int) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_message(item, index))
    elif kind == "function_call":
        call = {
            "id": _required_str(item, "call_id", index),
            "type": "function",
            "function": {
                "name": _required_str(item, "name", index),
                "arguments": item.get("arguments") or "",
            },
        }
        last = messages[-1] if messages else None
        # Calls one reply made together are one assistant message with several tool_calls.
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        elif last is not None and last["role"] == "assistant" and isinstance(last["content"], str):
            last["tool_calls"] = [call]
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": _required_str(item, "call_id", index),
                "content": output if isinstance(output, str) else _text_of(output, index),
            }
        )
    elif kind == "reasoning":
        return  # another model's reasoning, replayed by a client: nothing to send on
    else:
        raise ShapeError(f"input[{index}]: routerd does not support input items of type {kind!r}")


def _required_str(item: dict[str, Any], name: str, index: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise ShapeError(f"input[{index}].{name} must be a non-empty string")
    return value


def _message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise ShapeError(f"input[{index}].role must be user, assistant, system or developer")
    content = item.get("content")
    chat_role = "system" if role == "developer" else role
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise ShapeError(f"input[{index}].content must be a string or an array of parts")
    parts = [_part(part, index) for part in content]
    if role != "user":
        # Only a user message carries images in chat; the others are their text.
        return {"role": chat_role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": chat_role, "content": parts}


def _part(part: object, index: int) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise ShapeError(f"input[{index}].content: each part must be an object")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise ShapeError(f"input[{index}].content: a {kind} part needs its text")
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise ShapeError(
                f"input[{index}].content: routerd takes input_image parts with an image_url "
                "(a URL or a data: URL), not a file_id"
            )
        image: dict[str, Any] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise ShapeError(f"input[{index}].content: routerd does not support {kind!r} parts")


def _text_of(output: object, index: int) -> str:
    """A function_call_output given as parts: its text parts, joined."""
    if isinstance(output, list):
        return "".join(
            p["text"] for p in output if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    raise ShapeError(f"input[{index}].output must be a string or an array of text parts")


# ---- tools and formats ----------------------------------------------------------------


def _tools(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ShapeError("tools must be an array")
    builtin = sorted(
        {str(t.get("type")) for t in value if isinstance(t, dict) and t.get("type") != "function"}
    )
    if builtin or not all(isinstance(t, dict) for t in value):
        raise ShapeError(
            "routerd serves function tools only; it cannot run the built-in tool(s) "
            f"{', '.join(builtin) or 'given'} (web search, file search, code interpreter and "
            "the like run inside OpenAI's own service)"
        )
    tools = []
    for tool in value:
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise ShapeError("each function tool needs a name")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: object) -> object:
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
    raise ShapeError(
        "tool_choice must be auto, none, required or a function tool {type: function, name}"
    )


def _response_format(text: object) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema = {
            key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt
        }
        return {"type": "json_schema", "json_schema": schema}
    raise ShapeError(f"text.format type {fmt['type']!r} is not supported")

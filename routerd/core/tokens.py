"""What a chat request costs in tokens: a cheap prompt estimate and the output it asks for.

About four characters a token for English prose and code; images count a flat amount, with
no tokenizer download. The estimate feeds the tpm windows and the context-fit check, so
erring high is safer.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
IMAGE_TOKENS = 800


def _content_chars(content: Any) -> tuple[int, int]:
    """(characters, image tokens) of one message content: a string or a list of parts."""
    if isinstance(content, str):
        return len(content), 0
    chars = 0
    images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "image_url":
                    images += IMAGE_TOKENS
                else:
                    text = part.get("text")
                    if isinstance(text, str):
                        chars += len(text)
    return chars, images


def estimate_prompt(request: dict[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI-shaped chat request."""
    chars = 0
    tokens = 0
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            tokens += MESSAGE_OVERHEAD
            content_chars, images = _content_chars(message.get("content"))
            chars += content_chars
            tokens += images
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                chars += sum(len(str(call)) for call in calls)
    tools = request.get("tools")
    if isinstance(tools, list):
        chars += sum(len(str(tool)) for tool in tools)
    system = request.get("system")
    if isinstance(system, str):
        chars += len(system)
    return tokens + -(-chars // CHARS_PER_TOKEN)


def requested_max_tokens(request: dict[str, Any]) -> Any:
    """The output limit an OpenAI-shaped request names, as sent; None when it names none.

    ``max_completion_tokens`` supersedes the deprecated ``max_tokens``, as OpenAI documents.
    """
    limit = request.get("max_completion_tokens")
    return request.get("max_tokens") if limit is None else limit


def output_allowance(request: dict[str, Any]) -> int:
    """The output room the request asks for (see requested_max_tokens), 0 when it names none."""
    limit = requested_max_tokens(request)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return 0
    return max(0, limit)

"""OpenAI chat-completions wire types: the request the mock reads and the bodies it sends."""

from __future__ import annotations

from typing import Any

import msgspec


class ContentPart(msgspec.Struct):
    """One part of a multi-part message; only text parts carry text."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    """One message of the conversation."""

    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct):
    """``stream_options``: whether a final chunk carries the usage."""

    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    """The part of a chat-completions request the mock looks at."""

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None


class ErrorDetail(msgspec.Struct):
    """The ``error`` object of an OpenAI error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    """An OpenAI error response body."""

    error: ErrorDetail


class StreamErrorDetail(msgspec.Struct):
    """The error OpenAI sends inside a stream that already answered 200 (no param/code)."""

    message: str
    type: str


class StreamError(msgspec.Struct):
    """The ``data:`` payload of a mid-stream failure."""

    error: StreamErrorDetail


class FunctionCall(msgspec.Struct):
    """A tool call's function; ``arguments`` is a JSON document in a string."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    """One tool call of a reply."""

    id: str
    type: str
    function: FunctionCall


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    """The reply message; ``content`` is null when the reply is tool calls."""

    role: str
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(msgspec.Struct):
    """One choice of a whole reply."""

    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class PromptTokensDetails(msgspec.Struct):
    """What part of the prompt the organisation's prompt cache held."""

    cached_tokens: int = 0


class Usage(msgspec.Struct):
    """Token counts of one call."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)


class ChatCompletion(msgspec.Struct):
    """A whole (non-streamed) reply."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    """A piece of a streamed tool call's function: the name first, then argument text."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A piece of a streamed tool call; ``index`` ties the pieces together."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    """What one chunk adds to the reply; the last chunk's delta is empty."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct):
    """One choice of a streamed chunk; ``finish_reason`` is null until the last."""

    index: int
    delta: Delta
    finish_reason: str | None


class Chunk(msgspec.Struct, omit_defaults=True):
    """One ``chat.completion.chunk``; the usage chunk has no choices and a usage."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct):
    """One entry of GET /v1/models."""

    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    """The body of GET /v1/models."""

    object: str
    data: list[ModelCard]

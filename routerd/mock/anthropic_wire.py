"""Anthropic Messages wire types: the request the mock reads and the bodies and events it sends.

Content blocks and stream events are tagged on ``type``, as on the wire, so a block of a
type the mock does not know is a 400 (as it is at Anthropic) and every event encodes its
own ``type``. Unknown fields (``cache_control``, ``metadata``, ...) are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    """A text content block, in requests and in replies."""

    text: str


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    """An image content block; the mock never looks inside the source."""

    source: dict[str, Any]


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    """A tool call: the assistant's in a reply, or an earlier one sent back in the history."""

    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    """The user's answer to a tool call."""

    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool = False


ContentBlock = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock


class InputMessage(msgspec.Struct):
    """One message of the conversation."""

    role: str
    content: str | list[ContentBlock]


class MessagesRequest(msgspec.Struct):
    """The part of a Messages request the mock looks at.

    ``max_tokens`` is required by Anthropic; it is optional here so its absence earns
    Anthropic's own message rather than a decoder's.
    """

    model: str
    messages: list[InputMessage]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False


class Usage(msgspec.Struct):
    """Token counts of one call."""

    input_tokens: int
    output_tokens: int
    # Prompt tokens read from the organisation's prompt cache (not in input_tokens).
    cache_read_input_tokens: int = 0


class Message(msgspec.Struct):
    """A whole reply; in ``message_start`` the same shape with no content yet."""

    id: str
    type: str
    role: str
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class ErrorDetails(msgspec.Struct):
    """``error.details``: the machine-readable reason some errors carry."""

    error_code: str


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    """The ``error`` object of an Anthropic error."""

    type: str
    message: str
    details: ErrorDetails | None = None


class ErrorBody(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    """An error response body; inside a stream it comes without ``request_id``."""

    error: ErrorDetail
    request_id: str | None = None


# Stream events. The event name on the ``event:`` line is the tag.


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    """The first event: the reply's envelope with empty content."""

    message: Message


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    """A content block opens; a tool_use block opens with an empty input."""

    index: int
    content_block: TextBlock | ToolUseBlock


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    """A keep-alive that carries nothing."""


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    """More text for a text block."""

    text: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    """A piece of a tool call's input JSON; the pieces concatenate to the whole document."""

    partial_json: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    """A delta for the block at ``index``."""

    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    """The block at ``index`` is complete."""

    index: int


class StopDelta(msgspec.Struct):
    """How the reply ended, sent once it has."""

    stop_reason: str
    stop_sequence: str | None


class OutputUsage(msgspec.Struct):
    """``message_delta``'s usage: the output tokens so far (cumulative, not an increment)."""

    output_tokens: int


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    """The reply's stop reason and final output token count."""

    delta: StopDelta
    usage: OutputUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    """The last event of a complete stream."""


class FutureEvent(msgspec.Struct, tag="future_event", tag_field="type"):
    """An event type no client knows: Anthropic says to ignore unknown events, and may add some."""

    note: str


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | Ping
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | FutureEvent
    | ErrorBody
)

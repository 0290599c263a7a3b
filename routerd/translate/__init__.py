"""OpenAI chat <-> Anthropic Messages translation, for chains and fronts that mix the two (pure)."""

from __future__ import annotations

from routerd.translate.anthropic_in import MessagesRequest, to_openai
from routerd.translate.errors import TranslationError
from routerd.translate.reply import (
    AnthropicReply,
    anthropic_to_completion,
    openai_tool_call,
    tool_input,
)
from routerd.translate.request import DEFAULT_MAX_TOKENS, openai_to_anthropic
from routerd.translate.stream import AnthropicStreamTranslator
from routerd.translate.tables import anthropic_usage, finish_reason, openai_usage, stop_reason

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AnthropicReply",
    "AnthropicStreamTranslator",
    "MessagesRequest",
    "TranslationError",
    "anthropic_to_completion",
    "anthropic_usage",
    "finish_reason",
    "openai_to_anthropic",
    "openai_tool_call",
    "openai_usage",
    "stop_reason",
    "to_openai",
    "tool_input",
]

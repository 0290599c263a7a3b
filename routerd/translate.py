"""OpenAI chat shape <-> Anthropic Messages shape, for chains that mix providers (pure; no I/O).

Clients always speak OpenAI chat. For an Anthropic target the request is rewritten by
``openai_to_anthropic`` (routerd.translate_request) and the reply rewritten back by
``anthropic_to_completion`` or, for a stream, ``AnthropicStreamTranslator``
(routerd.translate_stream), so the client cannot tell which provider served it except by
the provider's name.
"""

from __future__ import annotations

from routerd.translate_request import DEFAULT_MAX_TOKENS, TranslationError, openai_to_anthropic
from routerd.translate_stream import (
    AnthropicReply,
    AnthropicStreamTranslator,
    anthropic_to_completion,
    finish_reason,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AnthropicReply",
    "AnthropicStreamTranslator",
    "TranslationError",
    "anthropic_to_completion",
    "finish_reason",
    "openai_to_anthropic",
]

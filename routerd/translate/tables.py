"""The words OpenAI chat and Anthropic Messages use for the same things, each table once.

Both directions read the same rows: a table maps one way and its inverse is derived from
it, so a reason or a choice added here is understood going out and coming back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "ANTHROPIC_TOOL_CHOICE",
    "FINISH_REASONS",
    "OPENAI_TOOL_CHOICE",
    "STOP_REASONS",
    "anthropic_usage",
    "finish_reason",
    "openai_usage",
    "stop_reason",
]

# (Anthropic stop_reason, OpenAI finish_reason). Several words on one side may share one on
# the other; the first row naming a word is the one the inverse maps it back to.
_REASONS = (
    ("end_turn", "stop"),
    ("stop_sequence", "stop"),
    ("pause_turn", "stop"),
    ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"),
    ("tool_use", "tool_calls"),
    ("tool_use", "function_call"),  # OpenAI's legacy name for a tool call
    ("refusal", "content_filter"),
)

# (OpenAI tool_choice string, Anthropic tool_choice type); "tool"/"function" name one tool.
_TOOL_CHOICES = (
    ("auto", "auto"),
    ("required", "any"),
    ("none", "none"),
)


def _first_wins(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for key, value in pairs:
        table.setdefault(key, value)
    return table


FINISH_REASONS = _first_wins(_REASONS)
STOP_REASONS = _first_wins((finish, stop) for stop, finish in _REASONS)
ANTHROPIC_TOOL_CHOICE = _first_wins(_TOOL_CHOICES)
OPENAI_TOOL_CHOICE = _first_wins((anthropic, openai) for openai, anthropic in _TOOL_CHOICES)


def finish_reason(stop_reason: object) -> str | None:
    """OpenAI's finish_reason for an Anthropic stop_reason (None while not stopped).

    A stop reason newer than this table reads as a plain stop.
    """
    if not isinstance(stop_reason, str) or not stop_reason:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def stop_reason(finish_reason: str | None) -> str:
    """Anthropic's stop_reason for an OpenAI finish_reason (end_turn for unknown ones)."""
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if type(value) is int else 0


def openai_usage(usage: object) -> dict[str, int]:
    """OpenAI usage for Anthropic's; cached and cache-writing input tokens are prompt tokens too."""
    if not isinstance(usage, dict) or not usage:
        return {}
    prompt = sum(
        _count(usage, name)
        for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    completion = _count(usage, "output_tokens")
    counts = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    # What the prompt cache saved and what it stored, kept for the client.
    if "cache_read_input_tokens" in usage:
        counts["cached_tokens"] = _count(usage, "cache_read_input_tokens")
    if written := _count(usage, "cache_creation_input_tokens"):
        counts["cache_creation_tokens"] = written
    return counts


def anthropic_usage(usage: dict[str, int]) -> dict[str, int]:
    """Anthropic usage for OpenAI's: input_tokens leaves out what the cache read or wrote,
    as Anthropic counts them."""
    cached = usage.get("cached_tokens", 0)
    written = usage.get("cache_creation_tokens", 0)
    counts = {
        "input_tokens": max(0, usage.get("prompt_tokens", 0) - cached - written),
        "output_tokens": usage.get("completion_tokens", 0),
    }
    if cached or written:
        counts["cache_read_input_tokens"] = cached
        counts["cache_creation_input_tokens"] = written
    return counts

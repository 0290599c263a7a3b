"""Anthropic's event stream in OpenAI terms: one Delta per event that says something.

Stop reasons become finish reasons and usage OpenAI usage (routerd.translate.tables);
``tool_use`` blocks become OpenAI tool calls, their input streamed as argument fragments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from routerd.core.calls import Delta
from routerd.core.classify import classify
from routerd.core.outcome import UpstreamFailure
from routerd.translate.reply import openai_tool_call
from routerd.translate.tables import finish_reason, openai_usage

__all__ = ["AnthropicStreamTranslator"]


class AnthropicStreamTranslator:
    """Turns Anthropic stream events into OpenAI-style Deltas, one event at a time.

    ``model``, ``usage`` and ``finish_reason`` hold the summary so far; ``done`` is set by
    ``message_stop``. An ``error`` event raises UpstreamFailure, classified from its body
    (scrubbed of ``key``) as a failure inside an accepted stream.
    """

    __slots__ = ("_clock", "_counts", "_key", "_tools", "done", "finish_reason", "model", "usage")

    def __init__(
        self, model: str = "", *, key: str = "", clock: Callable[[], float] = time.time
    ) -> None:
        self.model = model
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.done = False
        self._key = key
        self._clock = clock
        self._counts: dict[str, Any] = {}
        # Anthropic numbers every content block; OpenAI numbers only the tool calls.
        self._tools: dict[int, int] = {}

    def feed(self, event: str, data: dict[str, Any]) -> Delta | None:
        """Take one event (its SSE name and decoded data); return the Delta it makes, if any."""
        if event == "content_block_delta":
            return self._block_delta(data)
        if event == "content_block_start":
            return self._block_start(data)
        if event == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str) and message["model"]:
                    self.model = message["model"]
                self._count(message.get("usage"))
            return None
        if event == "message_delta":
            self._count(data.get("usage"))
            delta = data.get("delta")
            finish = finish_reason(delta.get("stop_reason")) if isinstance(delta, dict) else None
            if finish is None:
                return None
            self.finish_reason = finish
            return Delta(finish_reason=finish)
        if event == "message_stop":
            self.done = True
        elif event == "error":
            raise UpstreamFailure(classify(None, None, data, key=self._key, now=self._clock()))
        # content_block_stop, ping, and event types newer than this code say nothing.
        return None

    def _block_start(self, data: dict[str, Any]) -> Delta | None:
        block = data.get("content_block")
        if not isinstance(block, dict):
            return None
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return Delta(text=text) if isinstance(text, str) and text else None
        if kind != "tool_use" or not isinstance(data.get("index"), int):
            return None  # thinking, server tools and their results are not OpenAI output
        index = self._tools[data["index"]] = len(self._tools)
        call = openai_tool_call(block)
        # The input arrives as input_json_delta fragments; the opening {} is a placeholder.
        if not block.get("input"):
            call["function"]["arguments"] = ""
        return Delta(tool_calls=[{"index": index, **call}])

    def _block_delta(self, data: dict[str, Any]) -> Delta | None:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return None
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return Delta(text=text) if isinstance(text, str) and text else None
        if kind == "input_json_delta":
            block = data.get("index")
            index = self._tools.get(block) if isinstance(block, int) else None
            fragment = delta.get("partial_json")
            if index is None or not isinstance(fragment, str) or not fragment:
                return None  # a server tool's input, or the empty opening fragment
            return Delta(tool_calls=[{"index": index, "function": {"arguments": fragment}}])
        return None  # thinking, signature and citation deltas

    def _count(self, usage: object) -> None:
        # message_delta repeats the counts cumulatively, so the latest value of each wins.
        if isinstance(usage, dict):
            self._counts.update(
                (name, value) for name, value in usage.items() if type(value) is int
            )
            self.usage = openai_usage(self._counts)

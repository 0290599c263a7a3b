"""OpenAI's Responses API, the reply side: the ``response`` object and its event stream.

A finished Reply becomes ``output`` items (a ``message`` with ``output_text``, then one
``function_call`` per tool call), ``usage`` (input, output and cached tokens) and a
``status`` (``incomplete`` when the reply stopped at its token limit). Streamed, the same
reply is the documented event sequence, each event with its ``sequence_number``:
``response.created``, ``response.in_progress``, then per item ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ... ``.done`` (or
``response.function_call_arguments.delta`` ... ``.done``), ``response.output_item.done``, and
``response.completed`` (``response.incomplete``); a failure after the start is an ``error``
event and ``response.failed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from routerd.core.calls import Delta, Reply
from routerd.fronts.http.errors import HttpError
from routerd.fronts.http.wire import sse, trailer, unique_id

# Where a reply stopped, as the Responses API names it.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_id() -> str:
    return f"resp_{unique_id()}"


def usage(counts: dict[str, int]) -> dict[str, Any]:
    """Chat usage counts in the Responses shape, cached input tokens included."""
    prompt = counts.get("prompt_tokens", 0)
    output = counts.get("completion_tokens", 0)
    cached = counts.get("cached_tokens", counts.get("cache_read_input_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": counts.get("reasoning_tokens", 0)},
        "total_tokens": counts.get("total_tokens", prompt + output),
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """An assistant message item: its text as one output_text part once completed."""
    done = status == "completed"
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if done else [],
    }


def call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A function_call item from a chat tool call; its arguments once completed."""
    function = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or f"call_{unique_id()}",
        "name": function.get("name") or "",
        "arguments": (function.get("arguments") or "") if status == "completed" else "",
    }


def output_items(reply: Reply) -> list[dict[str, Any]]:
    """A finished reply's output: its text as a message, then each tool call."""
    items: list[dict[str, Any]] = []
    if reply.text or not reply.tool_calls:
        items.append(message_item(f"msg_{unique_id()}", reply.text))
    items.extend(call_item(f"fc_{unique_id()}", call) for call in reply.tool_calls or ())
    return items


def response_object(
    rid: str,
    created: int,
    echo: dict[str, Any],
    *,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    counts: dict[str, int] | None = None,
    finish_reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``response`` object, in one of its states."""
    incomplete = _INCOMPLETE.get(finish_reason or "") if status != "failed" else None
    if incomplete is not None and status == "completed":
        status = "incomplete"
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": model,
        "output": output,
        "usage": usage(counts) if counts is not None else None,
        "reasoning": {"effort": None, "summary": None},
        **echo,
    }


def history(messages: list[dict[str, Any]], reply: Reply) -> list[dict[str, Any]]:
    """The conversation so far, as chat messages: ``messages`` and the reply's turn."""
    turn: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_calls:
        turn["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": (call.get("function") or {}).get("name"),
                    "arguments": (call.get("function") or {}).get("arguments") or "",
                },
            }
            for call in reply.tool_calls
        ]
    elif turn["content"] is None:
        turn["content"] = ""
    return [*messages, turn]


class EventEncoder:
    """Writes one reply as the Responses event stream (the front's StreamEncoder).

    Items open as the deltas arrive: text opens a message item, a tool call's first delta
    a function_call item (closing the message before it). ``closing`` finishes every open
    item in order and sends the final response, which ``on_final`` receives with the reply.
    """

    def __init__(
        self,
        rid: str,
        model: str,
        echo: dict[str, Any],
        on_final: Callable[[Reply, dict[str, Any]], None] | None = None,
    ) -> None:
        self.id = rid
        self.created = int(time.time())
        self.model = model  # the route until a delta names the serving model
        self.echo = echo
        self._on_final = on_final
        self._opened = False
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # every item so far, in output order
        self._text: dict[str, Any] | None = None  # the message item being written
        self._calls: dict[int, dict[str, Any]] = {}  # tool index -> its open item

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(event, kind)

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        model = fields.pop("model", self.model)
        return response_object(
            self.id, self.created, self.echo, model=model, status=status, **fields
        )

    def opening(self) -> bytes:
        """response.created and response.in_progress, once (the first delta sends them if
        nothing did before, so the sequence numbers run in the order the events go out)."""
        if self._opened:
            return b""
        self._opened = True
        start = self._response("in_progress", output=[])
        return self._event("response.created", response=start) + self._event(
            "response.in_progress", response=start
        )

    def delta(self, delta: Delta) -> bytes:
        if delta.model:
            self.model = delta.model
        out = self.opening() if delta.text or delta.tool_calls else b""
        if delta.text:
            if self._text is None:
                out += self._open_text()
            item = self._text
            assert item is not None
            item["parts"].append(delta.text)  # joined once, when the item closes
            out += self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=item["index"],
                content_index=0,
                delta=delta.text,
                logprobs=[],
            )
        for call in delta.tool_calls or ():
            out += self._call_delta(call)
        return out

    def _open_text(self) -> bytes:
        item: dict[str, Any] = {
            "id": f"msg_{unique_id()}",
            "index": len(self._items),
            "parts": [],
            "kind": "text",
        }
        self._items.append(item)
        self._text = item
        part = {"type": "output_text", "text": "", "annotations": []}
        return self._event(
            "response.output_item.added",
            output_index=item["index"],
            item=message_item(item["id"], "", status="in_progress"),
        ) + self._event(
            "response.content_part.added",
            item_id=item["id"],
            output_index=item["index"],
            content_index=0,
            part=part,
        )

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        item = self._calls.get(index)
        function = call.get("function") or {}
        if item is None:
            out += self._close_text()
            item = {
                "id": f"fc_{unique_id()}",
                "index": len(self._items),
                "kind": "call",
                "call": {"id": call.get("id"), "function": {"name": function.get("name")}},
                "parts": [],
            }
            self._items.append(item)
            self._calls[index] = item
            added = call_item(item["id"], item["call"], status="in_progress")
            out += self._event("response.output_item.added", output_index=item["index"], item=added)
        elif function.get("name") and not item["call"]["function"]["name"]:
            item["call"]["function"]["name"] = function["name"]
        piece = function.get("arguments")
        if piece:
            item["parts"].append(piece)
            out += self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=item["index"],
                delta=piece,
            )
        return out

    def _close_text(self) -> bytes:
        item = self._text
        if item is None:
            return b""
        self._text = None
        text = "".join(item["parts"])
        part = {"type": "output_text", "text": text, "annotations": []}
        common = {"item_id": item["id"], "output_index": item["index"], "content_index": 0}
        item["done"] = message_item(item["id"], text)
        return (
            self._event("response.output_text.done", **common, text=text, logprobs=[])
            + self._event("response.content_part.done", **common, part=part)
            + self._event(
                "response.output_item.done", output_index=item["index"], item=item["done"]
            )
        )

    def _close_call(self, item: dict[str, Any]) -> bytes:
        arguments = "".join(item["parts"])
        call = {**item["call"], "function": {**item["call"]["function"], "arguments": arguments}}
        item["done"] = call_item(item["id"], call)
        return self._event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=item["index"],
            name=item["done"]["name"],
            arguments=arguments,
        ) + self._event("response.output_item.done", output_index=item["index"], item=item["done"])

    def closing(self, reply: Reply) -> bytes:
        """Every open item finished, then response.completed (or .incomplete)."""
        out = b""
        if not self._items:
            # A reply with no text and no call still answers with an (empty) message.
            out += self._open_text()
        out += self._close_text()
        for item in self._items:
            if item["kind"] == "call" and "done" not in item:
                out += self._close_call(item)
        final = self._response(
            "completed",
            model=reply.model,
            output=[item["done"] for item in self._items],
            counts=reply.usage,
            finish_reason=reply.finish_reason,
        )
        if self._on_final is not None:
            self._on_final(reply, final)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=final) + trailer(reply)

    def error(self, error: HttpError) -> bytes:
        """A failure after the stream began: an ``error`` event, then response.failed."""
        body = error.body["error"]
        failed = self._response(
            "failed",
            output=[item["done"] for item in self._items if "done" in item],
            error={"code": body.get("code") or body.get("type"), "message": body.get("message")},
        )
        return self._event(
            "error", code=body.get("code"), message=body.get("message"), param=None
        ) + self._event("response.failed", response=failed)

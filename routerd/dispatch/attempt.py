"""One attempt's values: the Call it sends, and what its result settles and records.

Pure functions over a Candidate (which target, which credential) and a provider's runtime
settings; the dispatcher awaits the call between them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from routerd.core import routing as core
from routerd.core.calls import Attempt, Call, Completion, Delta, Reply
from routerd.core.errors import Refused
from routerd.core.outcome import Failure, FailureClass
from routerd.core.plan import Candidate
from routerd.upstream.base import Adapter


@dataclass(slots=True)
class ProviderRuntime:
    """What an attempt needs from a provider besides its credentials."""

    name: str
    adapter: Adapter
    base_url: str
    timeout_s: float
    headers: dict[str, str]
    connect_timeout_s: float = 5.0


class ToolCalls:
    """OpenAI-style tool-call deltas (keyed by index) folded into whole tool calls.

    A name's or arguments' pieces are kept apart and joined once, in ``calls``: adding each
    piece to a string would copy the string so far per piece, and a tool call that writes a
    file streams its arguments in tens of thousands of pieces.
    """

    __slots__ = ("_arguments", "_ids", "_names")

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._names: list[list[str]] = []
        self._arguments: list[list[str]] = []

    def add(self, deltas: list[dict[str, Any]]) -> None:
        """Fold one Delta's tool-call pieces in."""
        for delta in deltas:
            index = delta.get("index", len(self._ids))
            while len(self._ids) <= index:
                self._ids.append("")
                self._names.append([])
                self._arguments.append([])
            if delta.get("id"):
                self._ids[index] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                self._names[index].append(function["name"])
            if function.get("arguments"):
                self._arguments[index].append(function["arguments"])

    def calls(self) -> list[dict[str, Any]]:
        """The whole calls so far, in index order."""
        return [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "".join(name), "arguments": "".join(arguments)},
            }
            for call_id, name, arguments in zip(
                self._ids, self._names, self._arguments, strict=True
            )
        ]


def merge_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole tool calls from OpenAI-style tool-call deltas (keyed by index)."""
    merged = ToolCalls()
    merged.add(deltas)
    return merged.calls()


def _merge_headers(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """``extra`` over ``base``; list-valued beta headers are joined, not replaced."""
    merged = dict(base)
    for name, value in extra.items():
        current = merged.get(name)
        merged[name] = f"{current},{value}" if current and name.endswith("-beta") else value
    return merged


def build_call(
    provider: ProviderRuntime, candidate: Candidate, key: str, body: dict[str, Any]
) -> Call:
    headers = provider.headers
    if candidate.long and candidate.target.long_context_headers:
        headers = _merge_headers(headers, candidate.target.long_context_headers)
    return Call(
        base_url=provider.base_url,
        model=candidate.target.model,
        key=key,
        body=body,
        timeout=provider.timeout_s,
        headers=headers,
        connect_timeout=provider.connect_timeout_s,
    )


def settled_outcome(result: Completion | Failure | None, latency_ms: float) -> core.Outcome:
    """What the core settles for an attempt that ended with ``result`` (None: cancelled)."""
    if result is None:
        return core.CANCELLED
    if isinstance(result, Failure):
        return result
    return core.Success(latency_ms, result.limits, result.usage.get("prompt_tokens", 0))


def record(
    candidate: Candidate,
    result: Completion | Failure,
    latency_ms: float,
    delivered: bool,
    attempts: list[Attempt],
) -> Reply | Failure:
    """Record a settled attempt; the reply, or the failure when another attempt may follow."""
    target, label = candidate.target, candidate.credential.label
    if isinstance(result, Failure):
        kind, message = result.cls.value, result.message
        attempts.append(Attempt(target.name, label, kind, result.status, latency_ms, message))
        if delivered or result.cls is FailureClass.BAD_REQUEST:
            # A stream that already reached the client cannot move elsewhere, and a bad
            # request would fail the same way anywhere.
            if delivered:
                message = f"stream failed after it began: {message}"
            details = result.details or None
            raise Refused(kind, message, attempts, result.retry_after, details) from None
        return result
    attempts.append(Attempt(target.name, label, "ok", 200, latency_ms))
    return Reply(
        text=result.text,
        model=result.model or target.model,
        provider=target.provider,
        credential=label,
        target=target.name,
        usage=result.usage,
        attempts=attempts,
        finish_reason=result.finish_reason,
        tool_calls=result.tool_calls,
    )


async def streamed(
    adapter: Adapter, call: Call, deliver: Callable[[Delta], Awaitable[None]]
) -> Completion:
    """Relay a streamed call's deltas to ``deliver`` and return it as one Completion."""
    parts: list[str] = []
    tool_calls = ToolCalls()
    async with adapter.stream(call) as upstream:
        async for delta in upstream:
            if delta.text:
                parts.append(delta.text)
            if delta.tool_calls:
                tool_calls.add(delta.tool_calls)
            if delta.model != upstream.model:
                # Every piece names the model serving it, as the finished reply will.
                delta = Delta(delta.text, delta.tool_calls, delta.finish_reason, upstream.model)
            await deliver(delta)
        return Completion(
            text="".join(parts),
            model=upstream.model,
            finish_reason=upstream.finish_reason,
            usage=upstream.usage,
            limits=upstream.limits,
            tool_calls=tool_calls.calls() or None,
        )

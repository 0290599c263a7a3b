"""The contract every upstream adapter keeps: one call in, a completion or a stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from routerd.outcome import RateLimitReport


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt against one target with one credential.

    ``body`` is the client's request in OpenAI chat shape; the adapter sets the model itself.
    ``timeout`` bounds the whole attempt (connect, first byte, and each read).
    """

    base_url: str
    model: str
    key: str = field(repr=False)
    body: dict[str, Any] = field(default_factory=dict)
    timeout: float = 120.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Completion:
    """A whole reply, normalised to OpenAI chat shape."""

    text: str
    model: str
    finish_reason: str | None
    usage: dict[str, int]
    limits: RateLimitReport
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed piece: text and/or OpenAI-style tool-call deltas."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


class Stream(Protocol):
    """An open upstream stream. ``limits`` is known once the response headers arrived.

    Iterating yields Deltas; an error after the first byte raises UpstreamFailure.
    After the iteration ends, ``usage``, ``model`` and ``finish_reason`` hold the summary.
    """

    limits: RateLimitReport
    usage: dict[str, int]
    model: str
    finish_reason: str | None

    def __aiter__(self) -> AsyncIterator[Delta]: ...


class Adapter(Protocol):
    """One per API kind, built around the daemon's one shared httpx client.

    Failures are raised as UpstreamFailure, already classified; httpx exceptions never
    leave the adapter, so the routing core never sees httpx.
    """

    kind: str

    async def complete(self, call: Call) -> Completion:
        """Send a non-streaming request and return the whole reply."""
        ...

    def stream(self, call: Call) -> AbstractAsyncContextManager[Stream]:
        """Open a streaming request; entering raises UpstreamFailure if it fails before any byte."""
        ...

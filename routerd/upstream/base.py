"""The contract every upstream adapter keeps: one call in, a completion or a stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from routerd.core.calls import Call, Completion, Delta
from routerd.core.outcome import RateLimitReport


class Stream(Protocol):
    """An open upstream stream. ``limits`` is read from the response headers when asked.

    Iterating yields Deltas; an error after the first byte raises UpstreamFailure.
    After the iteration ends, ``usage``, ``model`` and ``finish_reason`` hold the summary.
    """

    @property
    def limits(self) -> RateLimitReport: ...

    usage: dict[str, int]
    model: str
    finish_reason: str | None

    def __aiter__(self) -> AsyncIterator[Delta]: ...


class Adapter(Protocol):
    """One per API kind, built around the daemon's one upstream session.

    Failures are raised as UpstreamFailure, already classified; transport errors never
    leave the adapter, so the routing core never sees the HTTP client.
    """

    kind: str

    async def complete(self, call: Call) -> Completion:
        """Send a non-streaming request and return the whole reply."""
        ...

    def stream(self, call: Call) -> AbstractAsyncContextManager[Stream]:
        """Open a streaming request; entering raises UpstreamFailure if it fails before any byte."""
        ...

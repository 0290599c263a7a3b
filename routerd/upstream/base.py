"""The contract every upstream adapter keeps: one call in, a completion or a stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from routerd.core.calls import Call, Completion, Delta
from routerd.core.outcome import RateLimitReport


class LimitsOnAsking:
    """A stream's ``limits``, read from its response headers the first time they are asked
    for: the settle after the stream asks, so the first chunk does not wait for them."""

    __slots__ = ("_limits", "_read_limits")

    def __init__(self, read_limits: Callable[[], RateLimitReport]) -> None:
        self._read_limits = read_limits
        self._limits: RateLimitReport | None = None

    @property
    def limits(self) -> RateLimitReport:
        if self._limits is None:
            self._limits = self._read_limits()
        return self._limits


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

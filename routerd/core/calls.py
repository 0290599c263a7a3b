"""The values a request trades in: the Call out, the Completion or Deltas back, the Reply.

A Reply carries the Attempts that led to it; a refused request carries them in its Refused.

They live apart from routerd.upstream so that the translators, which build Deltas, import
nothing of the adapters that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from routerd.core.outcome import RateLimitReport

__all__ = ["Attempt", "Call", "Completion", "Delta", "Reply"]


class Call(msgspec.Struct, frozen=True):
    """One attempt against one target with one credential.

    ``body`` is the client's request in OpenAI chat shape; the adapter sets the model itself.
    ``timeout`` bounds each wait for the server (its first byte, then each read), and
    ``connect_timeout`` the connecting (never longer than ``timeout``).
    """

    base_url: str
    model: str
    key: str
    body: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout: float = 120.0
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout: float = 5.0

    def __repr__(self) -> str:
        # Everything but the key, which no repr, log line or traceback may show.
        return (
            f"Call(base_url={self.base_url!r}, model={self.model!r}, body={self.body!r}, "
            f"timeout={self.timeout!r}, headers={self.headers!r}, "
            f"connect_timeout={self.connect_timeout!r})"
        )

    @property
    def connect_s(self) -> float:
        """How long connecting may take."""
        return min(self.connect_timeout, self.timeout)


@dataclass(slots=True)
class Completion:
    """A whole reply, normalised to OpenAI chat shape."""

    text: str
    model: str
    finish_reason: str | None
    usage: dict[str, int]
    limits: RateLimitReport
    tool_calls: list[dict[str, Any]] | None = None


class Delta(msgspec.Struct, frozen=True):
    """One streamed piece: text and/or OpenAI-style tool-call deltas."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    # The model serving the stream, as its upstream names it (set by the dispatcher).
    model: str | None = None


class Attempt(msgspec.Struct, frozen=True):
    """One upstream attempt of a request: never a secret, only the credential's label.

    ``outcome`` is "ok" or the failure class; each front hands the trail to its client.
    """

    target: str
    credential: str
    outcome: str
    status: int | None = None
    latency_ms: float | None = None
    message: str | None = None


@dataclass(slots=True)
class Reply:
    """A finished request: the serving target's reply and the attempts that led to it."""

    text: str
    model: str
    provider: str
    credential: str
    target: str
    usage: dict[str, int]
    attempts: list[Attempt]
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None

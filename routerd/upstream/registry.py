"""Which adapter serves which API kind: one row per kind."""

from __future__ import annotations

from collections.abc import Callable

from routerd.upstream.anthropic import AnthropicAdapter
from routerd.upstream.base import Adapter
from routerd.upstream.openai import OpenAIAdapter
from routerd.upstream.session import UpstreamSession

# One row per API kind (config.ProviderKind). Adding a provider API is a module and a row.
_ADAPTERS: dict[str, Callable[[UpstreamSession], Adapter]] = {
    "anthropic": lambda http: AnthropicAdapter(http),
    "openai": lambda http: OpenAIAdapter(http, kind="openai"),
    "openai-compatible": lambda http: OpenAIAdapter(http, kind="openai-compatible"),
}


def adapter_for(kind: str, http: UpstreamSession) -> Adapter:
    """The adapter for one API kind, built around the daemon's one upstream session."""
    factory = _ADAPTERS.get(kind)
    if factory is not None:
        return factory(http)
    known = ", ".join(sorted(_ADAPTERS))
    raise ValueError(f"unknown upstream kind {kind!r} (known: {known})")

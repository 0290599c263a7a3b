"""Upstream adapters: one per API kind, chosen by ``adapter_for``."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from routerd.upstream.base import Adapter, Call, Completion, Delta, Stream
from routerd.upstream.openai import OpenAIAdapter, OpenAIStream

__all__ = [
    "Adapter",
    "Call",
    "Completion",
    "Delta",
    "OpenAIAdapter",
    "OpenAIStream",
    "Stream",
    "adapter_for",
]

# One row per API kind (config.ProviderKind). Adding a provider API is a module and a row.
_ADAPTERS: dict[str, Callable[[httpx.AsyncClient], Adapter]] = {
    "openai": lambda http: OpenAIAdapter(http, kind="openai"),
    "openai-compatible": lambda http: OpenAIAdapter(http, kind="openai-compatible"),
}
# Kinds the config accepts whose adapter is not written yet.
_PLANNED = frozenset({"anthropic"})


def adapter_for(kind: str, http: httpx.AsyncClient) -> Adapter:
    """The adapter for one API kind, built around the daemon's shared httpx client."""
    factory = _ADAPTERS.get(kind)
    if factory is not None:
        return factory(http)
    if kind in _PLANNED:
        raise ValueError(f"no upstream adapter for kind {kind!r} yet")
    known = ", ".join(sorted(_ADAPTERS.keys() | _PLANNED))
    raise ValueError(f"unknown upstream kind {kind!r} (known: {known})")

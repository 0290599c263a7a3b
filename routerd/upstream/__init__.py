"""Upstream adapters: one per API kind (``registry.adapter_for``), all on one httpx transport."""

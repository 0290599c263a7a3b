"""Upstream adapters: one per API kind (``registry.adapter_for``), on one keep-alive pool."""

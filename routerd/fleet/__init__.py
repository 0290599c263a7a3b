"""Shared state across hosts that use the same keys, on Redis >= 7 or Valkey."""

from routerd.fleet.backend import SharedState, SharedStats
from routerd.fleet.link import FleetLink
from routerd.fleet.setup import SharedStateCollector, connect_fleet

__all__ = ["FleetLink", "SharedState", "SharedStateCollector", "SharedStats", "connect_fleet"]

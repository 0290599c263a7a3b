"""The OpenAI- and Anthropic-compatible HTTP front, and the daemon's Prometheus metrics."""

from __future__ import annotations

from routerd.front.app import FrontApp, FrontState
from routerd.front.metrics import Metrics
from routerd.front.serve import FrontError, HttpFront

__all__ = ["FrontApp", "FrontError", "FrontState", "HttpFront", "Metrics"]

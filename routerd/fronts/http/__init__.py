"""The OpenAI- and Anthropic-compatible HTTP front, and the daemon's Prometheus metrics."""

from __future__ import annotations

from routerd.fronts.http.app import FrontApp, FrontState
from routerd.fronts.http.metrics import Metrics
from routerd.fronts.http.serve import FrontError, HttpFront

__all__ = ["FrontApp", "FrontError", "FrontState", "HttpFront", "Metrics"]

"""The one error a translator raises: the request says what the other API cannot express."""

from __future__ import annotations

__all__ = ["TranslationError"]


class TranslationError(ValueError):
    """The request has something the other API cannot express, or is not shaped as its own."""

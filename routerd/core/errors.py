"""Refused: the one error the core and the dispatcher raise when a request cannot be served.

``kind`` is a failure class from README's table (rate_limited, context_tier_downgrade,
quota_exhausted, unknown_route, ...). The core knows no wire shape: the msgpack front turns a
Refused into an Error message and the HTTP front into each API's error body, each in one
place (``fronts/msgpack/replies.py``, ``fronts/http/errors.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from routerd.core.calls import Attempt


class Refused(Exception):
    """A request the daemon cannot serve, with the failure class that stands in the way.

    ``retry_after`` is the hint, in seconds, for when the same request could succeed;
    ``details`` carries class-specific data (``largest_window``, ``long_lane_back_in``,
    ``requested_tokens``); ``attempts`` is the trail of upstream attempts made.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        attempts: Iterable[Attempt] = (),
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.attempts = list(attempts)
        self.retry_after = None if retry_after is None else round(max(0.0, retry_after), 3)
        self.details = details

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

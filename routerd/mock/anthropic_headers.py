"""The Anthropic dialect's rate-limit headers: one family per window, resets in RFC 3339."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from routerd.mock.asgi import Headers
from routerd.mock.limits import WindowState
from routerd.mock.state import Admission, WindowName


def window_of(admission: Admission, name: WindowName) -> WindowState | None:
    windows: dict[WindowName, WindowState | None] = {
        "requests": admission.requests,
        "tokens": admission.tokens,
        "input_tokens": admission.input_tokens,
        "output_tokens": admission.output_tokens,
        "long_requests": admission.long_requests,
    }
    return windows[name]


def limit_headers(admission: Admission, now: float) -> Headers:
    """anthropic-ratelimit-* for each window the key has; resets as RFC 3339 instants."""
    tokens = admission.tokens
    if tokens is None:
        # Anthropic's tokens-* headers describe the most restrictive token limit in force.
        split = [w for w in (admission.input_tokens, admission.output_tokens) if w is not None]
        tokens = min(split, key=lambda w: (w.remaining, w.limit), default=None)
    families = (
        ("requests", admission.requests),
        ("tokens", tokens),
        ("input-tokens", admission.input_tokens),
        ("output-tokens", admission.output_tokens),
    )
    headers: Headers = []
    for name, window in families:
        if window is None:
            continue
        prefix = f"anthropic-ratelimit-{name}"
        headers += [
            (f"{prefix}-limit".encode(), str(window.limit).encode()),
            (f"{prefix}-remaining".encode(), str(window.remaining).encode()),
            (f"{prefix}-reset".encode(), format_rfc3339(now + window.reset_s).encode()),
        ]
    return headers


def format_rfc3339(timestamp: float) -> str:
    """A Unix time as Anthropic writes resets: UTC, whole seconds, rounded up (never early)."""
    moment = datetime.fromtimestamp(ceil_s(timestamp), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ceil_s(seconds: float) -> int:
    # Rounding first keeps float noise (2.0000000001 s) from adding a second.
    return math.ceil(round(seconds, 6))

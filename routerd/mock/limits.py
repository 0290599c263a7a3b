"""Sliding rate-limit windows and the Go-style durations OpenAI reports them in."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window as a response reports it: ``reset_s`` is the time until it is empty."""

    limit: int
    remaining: int
    reset_s: float


class SlidingWindow:
    """Amounts (requests or tokens) admitted during the last ``length`` seconds.

    Time is a parameter of every method, so the window is tested without sleeping.
    """

    def __init__(self, limit: int, length: float) -> None:
        self.limit = limit
        self.length = length
        self._entries: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] + self.length <= now:
            _, amount = self._entries.popleft()
            self._used -= amount

    def used(self, now: float) -> int:
        """The amount admitted within the window ending at ``now``."""
        self._expire(now)
        return self._used

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` fits: 0 when it fits now, inf when it never will."""
        self._expire(now)
        excess = self._used + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for stamp, entry in self._entries:
            freed += entry
            if freed >= excess:
                return stamp + self.length - now
        return math.inf

    def add(self, amount: int, now: float) -> None:
        """Admit ``amount`` at ``now``."""
        self._expire(now)
        self._entries.append((now, amount))
        self._used += amount

    def state(self, now: float) -> WindowState:
        """What the rate-limit headers say about this window at ``now``."""
        self._expire(now)
        # OpenAI's reset is the time until the window is back to its initial state, which
        # is when the newest entry leaves it.
        reset_s = self._entries[-1][0] + self.length - now if self._entries else 0.0
        return WindowState(
            limit=self.limit, remaining=max(self.limit - self._used, 0), reset_s=reset_s
        )


def ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up, so a client that waits this long is never early."""
    # Rounding first keeps float noise (1.2000000001 s) from adding a millisecond.
    return max(math.ceil(round(seconds * 1000, 6)), 0)


def format_go_duration(seconds: float) -> str:
    """Format like Go's time.Duration at millisecond precision: "12ms", "1.234s", "6m0s"."""
    ms = ceil_ms(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"

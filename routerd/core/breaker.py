"""A circuit breaker per provider/model target, pure and driven by an injected clock.

closed: calls flow (until the target first answers, one call at a time for a short
probation, so a cold start does not send a whole burst to a dead target).
suspect: the last call failed, so one call at a time probes the target while the others
go elsewhere. open: no calls until ``until``, then one half-open probe; its success
closes the breaker, its failure opens it again for twice as long (up to ``max_open_s``).
Calls already in flight when it opens do not extend it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PROBATION_S = 2.0
# Doublings past this are capped by max_open_s anyway; the bound keeps 2**n a finite float
# however many openings a state file says there were.
MAX_DOUBLINGS = 1000


class BreakerState(enum.StrEnum):
    """The breaker's position."""

    CLOSED = "closed"
    SUSPECT = "suspect"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    """The health of one target (provider/model), independent of any key."""

    target: str
    failure_threshold: int = 3
    open_s: float = 5.0
    max_open_s: float = 120.0

    state: BreakerState = BreakerState.CLOSED
    until: float = 0.0
    opens: int = 0
    consecutive_failures: int = 0
    probes_in_flight: int = 0
    # Every call out to the target now, probe or not.
    in_flight: int = 0
    proven: bool = False
    probation_until: float = 0.0
    successes: int = 0
    failures: int = 0
    latency_ms: float | None = None

    def position(self, now: float) -> BreakerState:
        """The state at ``now``: an open breaker whose time ran out is half-open."""
        if self.state is BreakerState.OPEN and now >= self.until:
            return BreakerState.HALF_OPEN
        return self.state

    def admits(self, now: float) -> bool:
        """Whether a call may be sent to this target now."""
        position = self.position(now)
        if position is BreakerState.CLOSED:
            return self.proven or not self.probes_in_flight or now >= self.probation_until
        if position is BreakerState.OPEN:
            return False
        if position is BreakerState.SUSPECT:
            # Calls that went out before the failure came back are probing the target
            # already: one more would not be "one call at a time".
            return self.in_flight == 0
        return self.probes_in_flight == 0

    def free_at(self, now: float) -> float | None:
        """When the target admits a call again; None when only a running probe can tell."""
        if self.admits(now):
            return now
        position = self.position(now)
        if position is BreakerState.OPEN:
            return self.until
        if position is BreakerState.CLOSED:
            return self.probation_until
        return None

    def dispatched(self, now: float) -> bool:
        """A call is going out; returns whether it is a probe (any state but closed)."""
        position = self.position(now)
        self.in_flight += 1
        if position is BreakerState.HALF_OPEN:
            self.state = BreakerState.HALF_OPEN
        if position is BreakerState.CLOSED:
            if self.proven or self.probes_in_flight:
                return False
            self.probation_until = now + PROBATION_S
        self.probes_in_flight += 1
        return True

    def _end_probe(self, probe: bool) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def succeeded(self, latency_ms: float, probe: bool) -> BreakerState:
        """The target answered; returns the state before, for logging."""
        before = self.state
        self._end_probe(probe)
        self.successes += 1
        self.proven = True
        self.consecutive_failures = 0
        self.opens = 0
        self.state = BreakerState.CLOSED
        self.latency_ms = (
            latency_ms if self.latency_ms is None else 0.8 * self.latency_ms + 0.2 * latency_ms
        )
        return before

    def failed(self, now: float, probe: bool) -> BreakerState:
        """The target is unhealthy (target_down); returns the state before, for logging.

        One outage is one episode: once the breaker is open, only its half-open probe
        can keep it open longer. A call sent before it opened that fails now says nothing
        new, so it neither lengthens the open time nor counts as another opening.
        """
        before = self.state
        self._end_probe(probe)
        self.failures += 1
        self.consecutive_failures += 1
        # Only one probe runs while half-open (``admits``), so a probe failing then is the
        # half-open probe; any other call failing while open or half-open was sent earlier.
        stale = before is BreakerState.OPEN or (before is BreakerState.HALF_OPEN and not probe)
        if stale:
            return before
        if before is BreakerState.HALF_OPEN or self.consecutive_failures >= self.failure_threshold:
            self.opens += 1
            self.state = BreakerState.OPEN
            doublings = min(max(self.opens - 1, 0), MAX_DOUBLINGS)
            self.until = now + min(self.open_s * 2.0**doublings, self.max_open_s)
        elif before is BreakerState.CLOSED:
            self.state = BreakerState.SUSPECT
        return before

    def released(self, probe: bool) -> None:
        """A call ended saying nothing about the target (cancelled, or a key problem)."""
        self._end_probe(probe)

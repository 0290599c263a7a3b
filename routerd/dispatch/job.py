"""One request as the dispatcher works it: what it asks for, what it tried, and when it is
beyond help."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from routerd.core.calls import Attempt, Delta
from routerd.core.outcome import Failure
from routerd.core.plan import Exclusions, Plan
from routerd.dispatch.queue import hopeless
from routerd.dispatch.routes import Route

OnDelta = Callable[[Delta], Awaitable[None]]
# However many keys and targets a route has, one request makes at most this many attempts.
MAX_ATTEMPTS = 32


@dataclass(slots=True)
class Job:
    """One request as the dispatcher works it: what it asks for, and what it tried so far."""

    route: Route
    request: dict[str, Any]
    stream: bool
    on_delta: OnDelta | None
    deadline_at: float
    # (priority, client): its place among the route's waiters.
    sender: tuple[int, str]
    prompt: int = 0
    tokens: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    exclusions: Exclusions = field(default_factory=Exclusions)
    retries_left: int = 0
    last_failure: Failure | None = None
    # The conversation (its hashed session key), and whether its placement was counted.
    session: str | None = None
    placed: bool = False

    def retry_round(self) -> bool:
        """Every target failed this request once: the retry budget pays for another round,
        which the breakers pace (an open breaker makes it wait)."""
        if not (self.exclusions.down and self.retries_left > 0):
            return False
        if not all_excluded(self.route, self.exclusions):
            return False
        self.retries_left -= 1
        self.exclusions.down.clear()
        return True

    def beyond_help(self, decision: Plan) -> bool:
        """Whether to give up now rather than wait. A long request whose lanes all cool past
        its deadline is told at once (hopeless), so the agent can compact and resend."""
        return (
            len(self.attempts) >= MAX_ATTEMPTS
            or all_excluded(self.route, self.exclusions)
            or hopeless(decision, self.deadline_at)
        )


def all_excluded(route: Route, exclusions: Exclusions) -> bool:
    return all(exclusions.excludes(target.name) for target in route.chain)

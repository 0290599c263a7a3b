"""Where a conversation's turn goes: the affinity core's choice over the route's plan."""

from __future__ import annotations

from typing import Protocol

from routerd.core.affinity import Affinity, Held
from routerd.core.plan import Candidate, Exclusions, Plan, held_pair, listed_in_full
from routerd.dispatch.routes import Route


class Turn(Protocol):
    """What the placement reads of a request (the dispatcher's job)."""

    route: Route
    session: str | None
    tokens: int
    prompt: int
    exclusions: Exclusions


def placed_among_all(job: Turn) -> bool:
    """Whether the job's plans must list every candidate: a conversation's turn is placed
    among them (where a pool is too large to list, among the first it gives)."""
    return job.session is not None and listed_in_full(job.route.chain)


def place(affinity: Affinity, job: Turn, decision: Plan, now: float, *, count: bool) -> Candidate:
    """The candidate for a turn of the job's conversation; ``count``: tally where it went
    (once per request, not per retry)."""
    assert job.session is not None

    def check(held: Held) -> tuple[Candidate | None, str]:
        return held_pair(
            job.route.chain,
            held.target,
            held.provider,
            held.label,
            job.tokens,
            now,
            prompt_tokens=job.prompt,
            exclusions=job.exclusions,
        )

    candidate, outcome, reason = affinity.choose(job.session, decision.candidates, check, now)
    if count:
        affinity.count(outcome, reason)
    return candidate

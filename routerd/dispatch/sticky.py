"""Where a conversation's turn goes: the affinity core's choice over the route's plan."""

from __future__ import annotations

from routerd.core.affinity import Affinity, Held
from routerd.core.plan import Candidate, Exclusions, Plan, held_pair
from routerd.dispatch.routes import Route


def place(
    affinity: Affinity,
    key: str,
    route: Route,
    decision: Plan,
    tokens: int,
    prompt: int,
    exclusions: Exclusions,
    now: float,
) -> tuple[Candidate, str, str]:
    """The candidate for a turn of conversation ``key``, its outcome and its reason."""

    def check(held: Held) -> tuple[Candidate | None, str]:
        return held_pair(
            route.chain,
            held.target,
            held.provider,
            held.label,
            tokens,
            now,
            prompt_tokens=prompt,
            exclusions=exclusions,
        )

    return affinity.choose(
        key, decision.candidates, lambda held: check(held)[0], lambda held: check(held)[1], now
    )

"""How long the plan step takes to pick a credential, at 10, 1,000 and 10,000 keys per route.

One route, one target, one pool of N credentials, a share of them cooling (half of those
cooling by health, half with their requests window spent until a reset in the future). For
each rotation strategy it times what the dispatcher does per attempt: plan the request and
take ``decision.candidates[0]``. Prints the median microseconds per pick and its ratio to
the 20 us goal.

    .venv/bin/python bench/plan.py            # the full table
    .venv/bin/python bench/plan.py --quick    # fewer repetitions
"""

from __future__ import annotations

import inspect
import random
import statistics
import sys
import time
from typing import Any

from routerd.core.breaker import Breaker
from routerd.core.credential import CredentialState, Health
from routerd.core.plan import Exclusions, Target, plan

GOAL_US = 20.0
SIZES = (10, 1_000, 10_000)
STRATEGIES = ("headroom", "fill_first", "round_robin", "least_used", "random")
COOLING = (0.0, 0.5, 0.9)
NOW = 1_000.0
# Plan the way the dispatcher's _assess does: the first candidate is all it uses.
PICK_KW: dict[str, Any] = (
    {"first_only": True} if "first_only" in inspect.signature(plan).parameters else {}
)


def build(n: int, cooling: float, strategy: str, seed: int = 1) -> Target:
    """One target over ``n`` keys with varied headroom, ``cooling`` of them unusable now."""
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        c = CredentialState("p", f"k{i}", f"sha256:k{i}", i)
        c.proven = True
        c.uses = rng.randrange(1000)
        c.last_used = NOW - rng.uniform(0, 60)
        c.requests.limit = 1000
        c.requests.remaining = rng.randrange(1, 1000)
        c.requests.reset_at = NOW + rng.uniform(1, 60)
        c.requests.guessed = False
        pool.append(c)
    for j, i in enumerate(rng.sample(range(n), round(n * cooling))):
        c = pool[i]
        if j % 2:
            c.health = Health.COOLING
            c.until = NOW + rng.uniform(1, 60)
        else:
            c.requests.remaining = 0
    return Target("p/m", "p", "m", "openai", strategy, Breaker("p/m"), pool)


def time_pick(target: Target, budget_s: float, max_reps: int) -> float:
    """Median microseconds of plan() + candidates[0] over repeated picks."""
    chain, rng, rotations = [target], random.Random(3), {"p": 0}
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    # One pick first: an index built lazily is built here, not in the figures.
    plan(chain, 100, NOW, exclusions=Exclusions(), rotations=rotations, rng=rng, **PICK_KW)
    while len(samples) < max_reps and (len(samples) < 5 or time.perf_counter() < deadline):
        rotations["p"] += 1
        t0 = time.perf_counter()
        decision = plan(
            chain,
            100,
            NOW,
            prompt_tokens=80,
            exclusions=Exclusions(),
            rotations=rotations,
            rng=rng,
            **PICK_KW,
        )
        pick = decision.candidates[0]
        samples.append(time.perf_counter() - t0)
        assert pick.credential.free_at(NOW, 100) <= NOW
    return statistics.median(samples) * 1e6


def main() -> None:
    quick = "--quick" in sys.argv
    budget, reps = (0.05, 300) if quick else (0.3, 3000)
    mode = "first_only" if PICK_KW else "full plan"
    print(f"plan step, one pick ({mode}); median us per pick; x = ratio to {GOAL_US:g} us")
    header = f"{'strategy':<12} {'keys':>6} " + " ".join(
        f"{f'{int(c * 100)}% cool':>18}" for c in COOLING
    )
    print(header)
    for strategy in STRATEGIES:
        for n in SIZES:
            cells = []
            for cooling in COOLING:
                us = time_pick(build(n, cooling, strategy), budget, reps)
                cells.append(f"{us:>9.1f} ({us / GOAL_US:>5.2f}x)")
            print(f"{strategy:<12} {n:>6} " + " ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()

"""The routing decision: a pure function from (route, request, state snapshot, now) to a plan.

Like httpcore's ``_assign_requests_to_connections`` it only says what to do: which
(target, credential) pairs to try, in order, or the earliest time one frees up. The
dispatcher does the I/O afterwards, so this module is tested with an injected clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from routerd.core.breaker import Breaker
from routerd.core.credential import CredentialState, Health
from routerd.core.outcome import FailureClass
from routerd.core.poolindex import INDEX_MIN, StaleIndex, index_for

# Prompts estimated below this many tokens do not teach a target its token scale.
LEARN_MIN_TOKENS = 512


@dataclass(slots=True)
class Target:
    """One provider/model in a chain, with the pool of credentials that serves it."""

    name: str
    provider: str
    model: str
    kind: str
    strategy: str
    breaker: Breaker
    pool: list[CredentialState]
    context_window: int | None = None
    long_context_window: int | None = None
    long_context_headers: dict[str, str] = field(default_factory=dict)
    token_scale: float = 1.0

    def learn_tokens(self, estimated: int, reported: int) -> None:
        """Correct this target's token estimate by the prompt tokens its provider reported."""
        # A short prompt's count is mostly fixed overhead (message framing on either side),
        # which says nothing about the ratio that matters: a long prompt's, near a window.
        if estimated < LEARN_MIN_TOKENS or reported <= 0:
            return
        ratio = max(0.25, min(4.0, reported / estimated))
        self.token_scale = 0.8 * self.token_scale + 0.2 * ratio

    def window_for(self, tokens: int) -> tuple[bool, bool]:
        """(fits at all, needs the long-context lane) for a request of ``tokens``."""
        if self.context_window is None or tokens <= self.context_window:
            return True, False
        if self.long_context_window is not None and tokens <= self.long_context_window:
            return True, True
        return False, False


class Candidate(msgspec.Struct, frozen=True):
    """A (target, credential) pair to try; ``long`` when it uses the long-context lane."""

    target: Target
    credential: CredentialState
    long: bool = False


@dataclass(slots=True)
class Plan:
    """What to do for a request now.

    ``candidates`` in the order to try. When empty: ``free_at`` is the earliest time one frees
    up (``math.inf``: only a finished request can free one; None: nothing ever will), and
    ``blocked`` the failure class that stands in the way, for the error the client gets.
    ``largest_window`` is the largest context window in the chain, ``available_window`` the
    largest one that could serve a request right now, ``long_lane_back_at`` when the
    first cooling long-context lane is expected back. ``partial``: only the first
    candidate was looked for (``first_only``), and the other fields are not filled in.
    """

    candidates: list[Candidate] = field(default_factory=list)
    free_at: float | None = None
    blocked: FailureClass | None = None
    largest_window: int | None = None
    available_window: int | None = None
    long_lane_back_at: float | None = None
    partial: bool = False


@dataclass(slots=True)
class Exclusions:
    """What this one request has already ruled out.

    ``down``: targets that failed it as target_down (a retry round clears them);
    ``targets``: targets it cannot fit; ``long_only``: targets whose provider found it too
    long for the normal window, so only their long-context window may take it;
    ``credentials``: keys that cannot serve it.
    """

    down: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    long_only: set[str] = field(default_factory=set)
    credentials: set[tuple[str, str]] = field(default_factory=set)

    def excludes(self, target: str) -> bool:
        """Whether the request has ruled this target out."""
        return target in self.down or target in self.targets


_HEALTH_CLASS = {
    Health.COOLING: FailureClass.RATE_LIMITED,
    Health.PARKED: FailureClass.QUOTA_EXHAUSTED,
    Health.DISABLED: FailureClass.AUTH_FAILED,
}
# Which blocker to name when several stand in the way: the one a wait cannot fix last.
_RANK = {
    FailureClass.RATE_LIMITED: 0,
    FailureClass.LONG_CONTEXT_LIMITED: 1,
    FailureClass.TARGET_DOWN: 2,
    FailureClass.QUOTA_EXHAUSTED: 3,
    FailureClass.AUTH_FAILED: 4,
    FailureClass.CONTEXT_OVERFLOW: 5,
}


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _blocker(current: FailureClass | None, new: FailureClass) -> FailureClass:
    if current is None or _RANK[new] < _RANK[current]:
        return new
    return current


def order_pool(
    pool: Sequence[CredentialState],
    strategy: str,
    now: float,
    rng: random.Random,
    rotation: int,
) -> list[CredentialState]:
    """Order the usable credentials of one pool by the provider's rotation strategy."""
    if len(pool) < 2:
        return list(pool)  # one key (or none): every strategy agrees
    if strategy == "fill_first":
        return sorted(pool, key=lambda c: c.order)
    if strategy == "round_robin":
        ordered = sorted(pool, key=lambda c: c.order)
        if not ordered:
            return ordered
        start = rotation % len(ordered)
        return ordered[start:] + ordered[:start]
    if strategy == "least_used":
        return sorted(pool, key=lambda c: (c.in_flight, c.uses, c.order))
    if strategy == "random":
        shuffled = list(pool)
        rng.shuffle(shuffled)
        return shuffled
    # headroom: most capacity left as last reported, then fewest in flight, then the one
    # rested longest, so a key is rotated away from before it runs dry.
    return sorted(pool, key=lambda c: (-c.headroom(now), c.in_flight, c.last_used, c.order))


def plan(
    chain: Sequence[Target],
    tokens: int,
    now: float,
    *,
    prompt_tokens: int | None = None,
    exclusions: Exclusions | None = None,
    rotations: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
    first_only: bool = False,
) -> Plan:
    """Decide where a request of ``tokens`` (prompt plus output) can go at ``now``.

    Targets come in chain order; a target is skipped when the request ruled it out, when it
    cannot fit the request, or when its breaker admits no call. Within a target, the usable
    credentials come in the order of the pool's strategy. Where ``prompt_tokens`` is given,
    each target scales that part by what its provider's usage reports taught it.

    ``first_only``: the caller takes the first candidate and plans again after a failure,
    so only that one is looked for: a small pool is ordered and its keys tried in that
    order until one is usable, a large one read from its index (see poolindex.py). A
    request that finds none gets the full plan, to say why and until when.
    """
    exclusions = exclusions or Exclusions()
    rotations = rotations or {}
    rng = rng or random.Random()
    if first_only:
        first = _first(chain, tokens, now, prompt_tokens, exclusions, rotations, rng)
        if first is not None:
            return Plan([first], partial=True)
    result = Plan()
    any_fit = False
    for target in chain:
        need = tokens
        if prompt_tokens is not None and target.token_scale != 1.0:
            need = tokens + round(prompt_tokens * (target.token_scale - 1.0))
        window = target.long_context_window or target.context_window
        if window is not None:
            result.largest_window = max(result.largest_window or 0, window)
        _note_available_window(result, target, now)
        if exclusions.excludes(target.name):
            continue
        fits, long = target.window_for(need)
        if target.name in exclusions.long_only:
            fits = long = target.long_context_window is not None
        if not fits:
            result.blocked = _blocker(result.blocked, FailureClass.CONTEXT_OVERFLOW)
            continue
        any_fit = True
        if not target.breaker.admits(now):
            result.free_at = _earliest(result.free_at, target.breaker.free_at(now) or math.inf)
            result.blocked = _blocker(result.blocked, FailureClass.TARGET_DOWN)
            continue
        usable = _usable_credentials(result, target, exclusions, need, long, now)
        ordered = order_pool(usable, target.strategy, now, rng, rotations.get(target.provider, 0))
        result.candidates.extend(Candidate(target, c, long) for c in ordered)
    if not any_fit:
        result.free_at = None
    return result


def listed_in_full(chain: Sequence[Target]) -> bool:
    """Whether the full plan of ``chain`` lists its candidates at a small pool's cost: no
    pool in it is large enough for an index."""
    return all(len(t.pool) < INDEX_MIN for t in chain)


def held_pair(
    chain: Sequence[Target],
    target_name: str,
    provider: str,
    label: str,
    tokens: int,
    now: float,
    *,
    prompt_tokens: int | None = None,
    exclusions: Exclusions | None = None,
) -> tuple[Candidate | None, str]:
    """One (target, credential) pair of ``chain`` checked as the plan checks it: the
    Candidate when it can take a request of ``tokens`` now, else None and why not
    (a conversation's affinity asks this of the pair that served its last turn)."""
    exclusions = exclusions or Exclusions()
    target = next((t for t in chain if t.name == target_name), None)
    if target is None or target.provider != provider:
        return None, "gone"
    credential = next((c for c in target.pool if c.label == label), None)
    if credential is None:
        return None, "gone"
    need = tokens
    if prompt_tokens is not None and target.token_scale != 1.0:
        need = tokens + round(prompt_tokens * (target.token_scale - 1.0))
    fits, long = target.window_for(need)
    if target.name in exclusions.long_only:
        fits = long = target.long_context_window is not None
    if not fits:
        return None, "too_long"
    if exclusions.excludes(target.name) or (provider, label) in exclusions.credentials:
        return None, "failed"
    if not target.breaker.admits(now):
        return None, "target_down"
    health = credential.current_health(now)
    if health is not Health.READY:
        return None, health.value
    if long and not credential.long_lane_open(now):
        return None, "long_context_limited"
    if credential.free_at(now, need, long=long) > now:
        return None, "no_headroom"
    return Candidate(target, credential, long), ""


def _first(
    chain: Sequence[Target],
    tokens: int,
    now: float,
    prompt_tokens: int | None,
    exclusions: Exclusions,
    rotations: Mapping[str, int],
    rng: random.Random,
) -> Candidate | None:
    """The full plan's first candidate, found without ordering every pool (None: none)."""
    for target in chain:
        need = tokens
        if prompt_tokens is not None and target.token_scale != 1.0:
            need = tokens + round(prompt_tokens * (target.token_scale - 1.0))
        if exclusions.excludes(target.name):
            continue
        fits, long = target.window_for(need)
        if target.name in exclusions.long_only:
            fits = long = target.long_context_window is not None
        if not fits or not target.breaker.admits(now):
            continue
        rotation = rotations.get(target.provider, 0)
        found = _first_usable(target, exclusions, need, long, now, rotation, rng)
        if found is not None:
            return Candidate(target, found, long)
    return None


def _usable(
    c: CredentialState, ruled_out: set[tuple[str, str]], need: int, long: bool, now: float
) -> bool:
    """Whether ``c`` can take ``need`` tokens now (``_usable_credentials``' test, one key)."""
    if ruled_out and (c.provider, c.label) in ruled_out:
        return False
    if long and not c.long_lane_open(now):
        return False
    return c.free_at(now, need, long=long) <= now


# Strategies whose order is a total order of the keys themselves: the first usable key in
# the whole pool's order is the first of the usable keys' order.
_KEYED = frozenset({"fill_first", "least_used", "headroom"})


def _first_usable(
    target: Target,
    exclusions: Exclusions,
    need: int,
    long: bool,
    now: float,
    rotation: int,
    rng: random.Random,
) -> CredentialState | None:
    """The first usable key of the target's pool in its strategy's order.

    A large pool reads it from its index. A small one (or a large one whose index went
    stale) is ordered whole and its keys tried in that order, so a pick whose first key is
    free tests that key alone; round robin and random order the usable keys only, since
    where the rotation lands depends on how many there are.
    """
    ruled_out = exclusions.credentials

    def usable(c: CredentialState) -> bool:
        return _usable(c, ruled_out, need, long, now)

    if len(target.pool) >= INDEX_MIN:
        excluded = any(provider == target.provider for provider, _ in ruled_out)
        try:
            return index_for(target.pool, target.strategy, now).first(
                usable, now, rotation, rng, excluded
            )
        except StaleIndex:
            pass
    if target.strategy in _KEYED:
        ordered = order_pool(target.pool, target.strategy, now, rng, rotation)
        return next((c for c in ordered if usable(c)), None)
    ordered = order_pool([c for c in target.pool if usable(c)], target.strategy, now, rng, rotation)
    return ordered[0] if ordered else None


def _usable_credentials(
    result: Plan, target: Target, exclusions: Exclusions, need: int, long: bool, now: float
) -> list[CredentialState]:
    """The target's credentials that can take ``need`` tokens now, in pool order.

    Each one that cannot moves ``result``'s ``free_at``, ``blocked`` and (for a cooling
    long-context lane) ``long_lane_back_at``.
    """
    usable: list[CredentialState] = []
    for credential in target.pool:
        if (credential.provider, credential.label) in exclusions.credentials:
            continue
        if long and not credential.long_context:
            # This key has no long-context tier: its lane never opens, so it sets no time.
            result.blocked = _blocker(result.blocked, FailureClass.CONTEXT_OVERFLOW)
            continue
        if long and not credential.long_lane_open(now):
            result.long_lane_back_at = _earliest(
                result.long_lane_back_at, credential.long_lane_until
            )
            result.free_at = _earliest(result.free_at, credential.long_lane_until)
            result.blocked = _blocker(result.blocked, FailureClass.LONG_CONTEXT_LIMITED)
            continue
        free_at = credential.free_at(now, need, long=long)
        if free_at <= now:
            usable.append(credential)
            continue
        result.free_at = _earliest(result.free_at, free_at)
        health = credential.current_health(now)
        result.blocked = _blocker(
            result.blocked, _HEALTH_CLASS.get(health, FailureClass.RATE_LIMITED)
        )
    return usable


def _note_available_window(result: Plan, target: Target, now: float) -> None:
    """Raise ``available_window`` to the largest window this target can serve right now."""
    if target.context_window is None or not target.breaker.admits(now):
        return
    window = None
    for credential in target.pool:
        if credential.free_at(now, 1) > now:
            continue
        window = target.context_window
        if target.long_context_window is not None and credential.long_lane_open(now):
            window = target.long_context_window
            break
    if window is not None:
        result.available_window = max(result.available_window or 0, window)

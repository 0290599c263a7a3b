"""An index over a large pool: its usable keys kept in strategy order, its resting keys aside.

The plan of a large pool asks for the first usable credential only; scanning and sorting
every key per request costs milliseconds at 10,000 keys. The index keeps each key either
*ready* (in a sorted list by the strategy's key) or *resting* (in a heap by the time it may
be usable again), so a pick reads the head of the sorted list and never looks at a resting
key. Credentials tell their watching indexes when they change (``CredentialState.changed``);
the time-driven changes (a cooldown or a window's reset running out) are timers here. Every
pick is checked against the credential itself, so a change the index missed (a reload's new
limits, a restored state) can cost a better key for a while, never a wrong one; a pool that
changed its members, or a clock that went back, rebuilds the index.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence

from routerd.core.credential import CredentialState, Health

# A pool this large is indexed; a smaller one is ordered whole at each pick (plan.py).
INDEX_MIN = 64
# Rebuilt this often anyway (seconds of the plan's clock), so a missed change cannot last.
REFRESH_S = 30.0

Key = tuple[float, ...]
Usable = Callable[[CredentialState], bool]


def rest_until(c: CredentialState, now: float) -> float:
    """When ``c`` may take some request again, whatever its size: a lower bound of
    ``free_at`` over every request size and lane (``now`` or earlier: usable now)."""
    health = c.current_health(now)
    if health is Health.DISABLED:
        return math.inf if c.probing else max(now, c.until)
    if health is not Health.READY:
        return c.until
    if c.max_concurrent is not None and c.in_flight >= c.max_concurrent:
        return math.inf
    if not c.proven and c.in_flight and now < c.probation_until:
        return c.probation_until
    if not c.proven and now < c.remote_probe_until:
        return c.remote_probe_until
    if now < c.held_until:
        return c.held_until
    at = now if c.requests.guarded else max(now, c.requests.free_at(1, now))
    if c.rpm is not None:
        at = max(at, c.rpm.free_at(1, now))
    return at


def _constrained_until(c: CredentialState, now: float) -> float:
    """Until when a ready ``c`` may still refuse some requests (by size or lane); 0: never."""
    until = 0.0
    if c.tpm is not None:
        return math.inf
    if c.tokens.remaining is not None and now < c.tokens.reset_at:
        until = c.tokens.reset_at
    if c.long_lane_until > now:
        until = max(until, c.long_lane_until)
    if not c.long_proven and c.long_in_flight and now < c.long_probation_until:
        until = max(until, c.long_probation_until)
    return until


class StaleIndex(Exception):
    """The pool no longer holds a key where the index put it: plan this one in full."""


class PoolIndex:
    """The ready keys of one pool in its strategy's order, the resting ones by wake time."""

    def __init__(self, pool: list[CredentialState], strategy: str) -> None:
        self.pool = pool
        self.strategy = strategy
        self.members: list[CredentialState] = []
        self.slot: dict[int, int] = {}
        self.dirty: set[int] = set()
        self.keys: list[Key] = []
        self.key_of: dict[int, Key] = {}
        self.constrained: set[int] = set()
        self.stamps: list[int] = []
        self.timers: list[tuple[float, int, int]] = []
        self.built_at = -math.inf

    def changed(self, credential: CredentialState) -> None:
        """``credential`` changed: place it anew before the next pick."""
        pos = self.slot.get(id(credential))
        if pos is not None:
            self.dirty.add(pos)

    def rebuild(self, now: float) -> None:
        """Index the pool as it is at ``now``."""
        self.members = list(self.pool)
        self.slot = {id(c): pos for pos, c in enumerate(self.members)}
        self.dirty.clear()
        self.keys, self.key_of, self.constrained = [], {}, set()
        self.stamps = [0] * len(self.members)
        self.timers = []
        self.built_at = now
        for pos, c in enumerate(self.members):
            if self not in c.watchers:
                c.watchers.append(self)
            self._place(pos, now)

    def refresh(self, now: float) -> None:
        """Bring the index up to ``now``: rebuild if stale, else apply changes and timers."""
        if len(self.pool) != len(self.members) or not (
            self.built_at <= now < self.built_at + REFRESH_S
        ):
            self.rebuild(now)
            return
        timers, stamps = self.timers, self.stamps
        while timers and timers[0][0] <= now:
            _, pos, stamp = heapq.heappop(timers)
            if stamp == stamps[pos]:
                self.dirty.add(pos)
        if self.dirty:
            dirty, self.dirty = self.dirty, set()
            for pos in dirty:
                self._place(pos, now)

    def _key(self, c: CredentialState, pos: int, now: float) -> Key:
        if self.strategy == "least_used":
            return (c.in_flight, c.uses, c.order, pos)
        if self.strategy == "headroom":
            return (-c.headroom(now), c.in_flight, c.last_used, c.order, pos)
        return (c.order, pos)

    def _place(self, pos: int, now: float) -> None:
        """Put the key at ``pos`` among the ready or the resting, as it stands at ``now``."""
        c = self.members[pos]
        old = self.key_of.pop(pos, None)
        if old is not None:
            del self.keys[bisect_left(self.keys, old)]
        self.constrained.discard(pos)
        self.stamps[pos] += 1
        wake = rest_until(c, now)
        if wake > now:
            if wake < math.inf:
                heapq.heappush(self.timers, (wake, pos, self.stamps[pos]))
            return
        key = self._key(c, pos, now)
        insort(self.keys, key)
        self.key_of[pos] = key
        # A window's reset, or our send leaving a sliding window, changes the key's headroom
        # and what the key may take.
        wake = _constrained_until(c, now)
        if wake:
            self.constrained.add(pos)
        for at in (c.requests.next_change(now), c.tokens.next_change(now), wake):
            if now < at < math.inf:
                heapq.heappush(self.timers, (at, pos, self.stamps[pos]))

    def first(
        self, usable: Usable, now: float, rotation: int, rng: random.Random, excluded: bool
    ) -> CredentialState | None:
        """The first usable key in the strategy's order (``usable`` checks one exactly).

        ``excluded``: the request ruled out some of this pool's keys (they may be ready).
        Raises StaleIndex when the pool changed under the index.
        """
        keys = self.keys
        if not keys:
            return None
        if self.strategy in ("round_robin", "random"):
            if not excluded and not self.constrained:
                if self.strategy == "round_robin":
                    at = rotation % len(keys)
                else:
                    at = rng.randrange(len(keys))
                c = self._member(int(keys[at][-1]))
                if usable(c):
                    return c
                self._recheck(c, int(keys[at][-1]), now)
            ready = [self._member(int(k[-1])) for k in keys]
            return _rotate([c for c in ready if usable(c)], self.strategy, rotation, rng)
        for key in keys:
            c = self._member(int(key[-1]))
            if usable(c):
                return c
            self._recheck(c, int(key[-1]), now)
        return None

    def _member(self, pos: int) -> CredentialState:
        """The key indexed at ``pos``, if the pool still holds it there."""
        c = self.members[pos]
        if pos < len(self.pool) and self.pool[pos] is c:
            return c
        self.built_at = -math.inf
        raise StaleIndex(pos)

    def _recheck(self, c: CredentialState, pos: int, now: float) -> None:
        """A ready key refused: if it rests whatever the request, a change was missed."""
        if rest_until(c, now) > now:
            self.dirty.add(pos)


def _rotate(
    ordered: Sequence[CredentialState], strategy: str, rotation: int, rng: random.Random
) -> CredentialState | None:
    if not ordered:
        return None
    if strategy == "round_robin":
        return ordered[rotation % len(ordered)]
    return ordered[rng.randrange(len(ordered))]


_INDEXES: dict[tuple[int, str], PoolIndex] = {}


def index_for(pool: list[CredentialState], strategy: str, now: float) -> PoolIndex:
    """The index of ``pool`` in ``strategy``'s order, up to ``now`` (targets that share a
    pool share it). It keeps the pool list alive, so its id is not reused."""
    index = _INDEXES.get((id(pool), strategy))
    if index is None:
        index = _INDEXES[id(pool), strategy] = PoolIndex(pool, strategy)
    index.refresh(now)
    return index

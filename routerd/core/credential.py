"""One credential's state: health, learned rate-limit windows, cooldowns, quota and auth.

Everything here is pure and synchronous: time comes in as ``now`` (monotonic seconds), so the
cooldown logic is tested without sleeping. On the request path only the routing core
(``routing.py``) calls the changing methods; the actor task (``dispatch/actor.py``) does what
takes time (timers, logging, persistence).
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from routerd.core.outcome import Failure, FailureClass, RateLimitReport
from routerd.core.window import LearnedWindow as LearnedWindow

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
RPM_WINDOW_S = 60.0
# A credential that never answered is tried by one request at a time for this long: a bad
# or exhausted key fails fast, so a burst must not all land on it before the first answer.
PROBATION_S = 2.0
# The shortest cooldown, whatever the provider says ("retry-after: 0" included): a key that
# keeps answering 429 is never tried in a tight loop.
MIN_COOLDOWN_S = 0.1


class Health(enum.StrEnum):
    """What a credential can do right now."""

    READY = "ready"
    COOLING = "cooling"
    PARKED = "parked"
    DISABLED = "disabled"


class Lease(msgspec.Struct, frozen=True):
    """One request on a credential: its token estimate and what had been answered before it.

    ``long`` when the request uses the credential's long-context lane; ``sent_at`` when
    it was sent, which dates the provider's count of it.
    """

    tokens: int
    requests_mark: int
    tokens_mark: int
    long: bool = False
    sent_at: float | None = None


@dataclass(slots=True)
class LocalLimit:
    """A limit the config sets for this credential (rpm or tpm), as a sliding 60 s window."""

    limit: int
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def _trim(self, now: float) -> None:
        while self.spent and self.spent[0][0] <= now - RPM_WINDOW_S:
            _, amount = self.spent.popleft()
            self.total -= amount

    def free_at(self, amount: int, now: float) -> float:
        """The earliest time ``amount`` more fits the window (now if it fits already)."""
        self._trim(now)
        if self.total + amount <= self.limit:
            return now
        need = self.total + amount - self.limit
        for stamp, spent in self.spent:
            need -= spent
            if need <= 0:
                return stamp + RPM_WINDOW_S
        return now + RPM_WINDOW_S

    def spend(self, amount: int, now: float) -> None:
        """Record a request of ``amount`` at ``now``."""
        self._trim(now)
        self.spent.append((now, amount))
        self.total += amount

    def refund(self, amount: int, at: float) -> None:
        """Take back a request of ``amount`` recorded at ``at`` that was never sent."""
        for index in range(len(self.spent) - 1, -1, -1):
            if self.spent[index] == (at, amount):
                del self.spent[index]
                self.total -= amount
                return


class Watcher(Protocol):
    """Keeps something derived from credentials (the plan's pool index) current."""

    def changed(self, credential: CredentialState) -> None:
        """``credential``'s state changed."""


@dataclass(slots=True)
class CredentialState:
    """The state of one credential; the core changes it, the plan reads it."""

    provider: str
    label: str
    fingerprint: str
    order: int
    max_concurrent: int | None = None
    rpm: LocalLimit | None = None
    tpm: LocalLimit | None = None
    quota_park_s: float = 3600.0
    auth_probe_s: float = 3600.0
    # Keys of one organisation share its prompt cache: a conversation may move among them.
    cache_group: str | None = None
    # False: the key never has long context (no tier for it), so it is never tried for it.
    long_context: bool = True

    health: Health = Health.READY
    until: float = 0.0
    reason: str = ""
    backoff_level: int = 0
    probing: bool = False
    long_lane_until: float = 0.0
    long_lane_level: int = 0
    # The long-context lane has a probation of its own: a key may serve short requests and
    # still refuse every long one, so a burst of long requests must not all land on it.
    long_proven: bool = False
    long_probation_until: float = 0.0
    long_in_flight: int = 0

    requests: LearnedWindow = field(default_factory=LearnedWindow)
    tokens: LearnedWindow = field(default_factory=LearnedWindow)

    proven: bool = False
    probation_until: float = 0.0
    # Another host sharing this key tries it first (``core/shared.py``): until then, or until
    # it shares the verdict, this host leaves an unproven key alone.
    remote_probe_until: float = 0.0
    # The fleet's ledger of this key's provider window is full until then (``shared.py``).
    held_until: float = 0.0
    in_flight: int = 0
    uses: int = 0
    last_used: float = 0.0
    successes: int = 0
    failures: int = 0
    latency_ms: float | None = None
    # The pool indexes that hold this key (poolindex.py), told of every change made here.
    watchers: list[Watcher] = field(default_factory=list, repr=False, compare=False)

    # ---- reading ----------------------------------------------------------------------

    def current_health(self, now: float) -> Health:
        """Health at ``now``: a cooldown or a park that has run out is READY again."""
        if self.health in (Health.COOLING, Health.PARKED) and now >= self.until:
            return Health.READY
        return self.health

    def free_at(self, now: float, tokens: int, *, long: bool = False) -> float:
        """When this credential can take a request of ``tokens`` (``now`` if it can now).

        ``math.inf`` means only a finished request (max_concurrent) or a reload frees it.
        ``long``: the request needs the long-context lane (whose cooling the plan checks).
        """
        health = self.current_health(now)
        if health is Health.DISABLED:
            if self.probing:
                return math.inf
            return max(now, self.until)
        if health is not Health.READY:
            return self.until
        at = now
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            return math.inf
        if not self.proven and self.in_flight and now < self.probation_until:
            return self.probation_until
        if not self.proven and now < self.remote_probe_until:
            return self.remote_probe_until
        if now < self.held_until:
            return self.held_until
        if (
            long
            and not self.long_proven
            and self.long_in_flight
            and now < self.long_probation_until
        ):
            return self.long_probation_until
        if not self.requests.guarded:
            at = max(at, self.requests.free_at(1, now))
        if tokens <= (self.tokens.limit or 0):
            at = max(at, self.tokens.free_at(tokens, now))
        if self.rpm is not None:
            at = max(at, self.rpm.free_at(1, now))
        if self.tpm is not None and tokens <= self.tpm.limit:
            at = max(at, self.tpm.free_at(tokens, now))
        return at

    def headroom(self, now: float) -> float:
        """Share of capacity left, 0..1, from the windows the provider last reported.

        Unknown windows count as full, so a fresh key is preferred over a draining one.
        """
        # Each window's share left (unknown: none) read here in one pass: every key of a
        # pool ordered by headroom is asked on each pick.
        share = 1.0
        for window in (self.requests, self.tokens):
            limit = window.limit
            if not limit:
                continue
            left = window.left(now)
            if left is None:
                continue
            fraction = left / limit
            if fraction < share:
                share = max(0.0, fraction)
        return share

    # ---- changing ---------------------------------------------------------------------

    def changed(self) -> None:
        """Tell the watching pool indexes that this key's state changed."""
        for watcher in self.watchers:
            watcher.changed(self)

    def lease(self, now: float, tokens: int, *, long: bool = False) -> Lease:
        """A request is being sent with this credential (``long``: on its long-context lane)."""
        if not self.proven and not self.in_flight:
            self.probation_until = now + PROBATION_S
        if long:
            if not self.long_proven and not self.long_in_flight:
                self.long_probation_until = now + PROBATION_S
            self.long_in_flight += 1
        self.in_flight += 1
        self.uses += 1
        self.last_used = now
        marks = self.requests.spend(1, now), self.tokens.spend(tokens, now)
        lease = Lease(tokens, *marks, long=long, sent_at=now)
        if self.rpm is not None:
            self.rpm.spend(1, now)
        if self.tpm is not None:
            self.tpm.spend(tokens, now)
        if self.current_health(now) is Health.DISABLED:
            self.probing = True
        self.changed()
        return lease

    def release(self, lease: Lease | None = None) -> None:
        """A request ended; on its own (cancelled) this says nothing about the key."""
        self.in_flight = max(0, self.in_flight - 1)
        self.probing = False
        if lease is not None:
            if lease.long:
                self.long_in_flight = max(0, self.long_in_flight - 1)
            self.requests.answer(1)
            self.tokens.answer(lease.tokens)
        self.changed()

    def unsend(self, lease: Lease) -> None:
        """A leased request was never sent: undo what ``lease`` counted."""
        self.in_flight = max(0, self.in_flight - 1)
        self.probing = False
        self.uses = max(0, self.uses - 1)
        if lease.long:
            self.long_in_flight = max(0, self.long_in_flight - 1)
        self.requests.unspend(1)
        self.tokens.unspend(lease.tokens)
        if lease.sent_at is not None:
            if self.rpm is not None:
                self.rpm.refund(1, lease.sent_at)
            if self.tpm is not None:
                self.tpm.refund(lease.tokens, lease.sent_at)
        self.changed()

    def learn(
        self,
        limits: RateLimitReport | None,
        now: float,
        lease: Lease | None = None,
        *,
        counted: bool = True,
    ) -> None:
        """Take the rate-limit headers of the reply to ``lease``.

        ``counted``: the provider took the request into its windows (it did not refuse it),
        so the reply dates a share of them.
        """
        if limits is None:
            return
        if lease is None:
            lease = Lease(0, self.requests.sent, self.tokens.sent)
            amount = 0
        else:
            amount = 1
        sent_at = lease.sent_at if counted else None
        self.requests.learn(limits.requests, now, lease.requests_mark, amount, sent_at)
        self.tokens.learn(
            limits.tokens or limits.input_tokens, now, lease.tokens_mark, lease.tokens, sent_at
        )
        self.changed()

    def succeeded(
        self,
        now: float,
        latency_ms: float,
        limits: RateLimitReport | None,
        lease: Lease | None = None,
    ) -> Health:
        """A request on this credential succeeded; returns the health before, for logging."""
        before = self.current_health(now)
        self.learn(limits, now, lease)
        self.release(lease)
        self.successes += 1
        self.proven = True
        self.backoff_level = 0
        if lease is not None and lease.long:
            self.long_proven = True
            self.long_lane_level = 0
        self.latency_ms = (
            latency_ms if self.latency_ms is None else 0.8 * self.latency_ms + 0.2 * latency_ms
        )
        if before is not Health.READY or self.health is not Health.READY:
            self.health = Health.READY
            self.until = 0.0
            self.reason = ""
        self.changed()
        return before

    def failed(
        self, failure: Failure, now: float, rng: random.Random, lease: Lease | None = None
    ) -> None:
        """Apply the router action of README.md's failure-class table to this credential."""
        self.learn(failure.limits, now, lease, counted=False)
        self.release(lease)
        self._failed(failure, now, rng)
        self.changed()

    def _failed(self, failure: Failure, now: float, rng: random.Random) -> None:
        cls = failure.cls
        if cls is FailureClass.RATE_LIMITED:
            self.failures += 1
            self.proven = True  # the provider knows the key: it counted it against a window
            if failure.oversized:
                return
            self._cool(now, failure.retry_after, rng, f"rate limited ({failure.status or 429})")
        elif cls is FailureClass.LONG_CONTEXT_LIMITED:
            self.failures += 1
            self.proven = True  # the provider knows the key; only its long lane is shut
            wait = failure.retry_after
            if wait is None:
                wait = _backoff(self.long_lane_level, rng)
                self.long_lane_level += 1
            self.long_lane_until = now + max(wait, MIN_COOLDOWN_S)
        elif cls is FailureClass.QUOTA_EXHAUSTED:
            self.failures += 1
            park = failure.retry_after if failure.retry_after is not None else self.quota_park_s
            self.health = Health.PARKED
            self.until = now + park
            self.reason = "quota exhausted"
        elif cls is FailureClass.AUTH_FAILED:
            self.failures += 1
            self.health = Health.DISABLED
            self.until = now + self.auth_probe_s
            self.reason = f"auth failed ({failure.status or 401})"
        # target_down, context_overflow and bad_request say nothing about the key.

    def _cool(self, now: float, hint: float | None, rng: random.Random, reason: str) -> None:
        if hint is None:
            hint = _backoff(self.backoff_level, rng)
            self.backoff_level += 1
        previous = self.until if self.health is Health.COOLING else 0.0
        self.health = Health.COOLING
        self.until = max(previous, now + max(hint, MIN_COOLDOWN_S))
        self.reason = reason
        # The window is full: until its reset, our local estimate must say so too.
        self.requests.refused(self.until)

    def long_lane_open(self, now: float) -> bool:
        """Whether long-context requests may use this credential now."""
        return self.long_context and now >= self.long_lane_until


def _backoff(level: int, rng: random.Random) -> float:
    """Exponential backoff with jitter (0.75-1.0 of the step), as the official SDKs do it."""
    return float(min(BACKOFF_BASE_S * 2**level, BACKOFF_MAX_S) * rng.uniform(0.75, 1.0))

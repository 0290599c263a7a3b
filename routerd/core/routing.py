"""The routing core: begins and settles each attempt on a credential and a target's breaker.

Like httpcore's pool, each call decides and updates the bookkeeping in one synchronous
step, with time passed in as ``now``, and returns what happened as events (small frozen
dataclasses) for the dispatcher to hand to logging, persistence and waiters. Nothing else
changes credential or breaker state on the request path; the credential actor's timer only
folds a run-out cooldown into the state, through ``expire``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from routerd.core.breaker import BreakerState
from routerd.core.credential import CredentialState, Health, Lease
from routerd.core.outcome import Failure, FailureClass, RateLimitReport
from routerd.core.plan import Candidate, Exclusions

# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialCooled:
    """A rate limit cooled the credential until ``until``."""

    provider: str
    label: str
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class CredentialParked:
    """The credential's quota ran out: it is parked until ``until``."""

    provider: str
    label: str
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class CredentialDisabled:
    """The provider refused the key; one request probes it again at ``until``."""

    provider: str
    label: str
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class CredentialReady:
    """The credential serves again; ``was`` is the health it left."""

    provider: str
    label: str
    was: Health


@dataclass(frozen=True, slots=True)
class WindowLearned:
    """A reply told the size of one of the credential's windows ("requests" or "tokens")."""

    provider: str
    label: str
    window: str
    limit: int


@dataclass(frozen=True, slots=True)
class BreakerOpened:
    """The target is down: no calls until ``until``, then one half-open probe."""

    target: str
    was: BreakerState
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerSuspect:
    """A call to the target failed: one call at a time probes it."""

    target: str
    was: BreakerState
    reason: str


@dataclass(frozen=True, slots=True)
class BreakerClosed:
    """The target answered: calls flow again."""

    target: str
    was: BreakerState


@dataclass(frozen=True, slots=True)
class BreakerHalfOpen:
    """The breaker's open time ran out and this attempt is its probe."""

    target: str


CredentialEvent = (
    CredentialCooled | CredentialParked | CredentialDisabled | CredentialReady | WindowLearned
)
BreakerEvent = BreakerOpened | BreakerSuspect | BreakerClosed | BreakerHalfOpen
Event = CredentialEvent | BreakerEvent

# ---- outcomes -----------------------------------------------------------------------


# Not frozen: one is made per request, and a frozen dataclass takes twice as long to make.
@dataclass(slots=True)
class Success:
    """The upstream answered; ``prompt_tokens`` is what it counted (0 when it did not say)."""

    latency_ms: float
    limits: RateLimitReport | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The attempt ended without a verdict on key or target (client gone, deadline)."""


CANCELLED = Cancelled()
# Cancelled before it was sent (another host's limits left no room): the request is taken
# back from the key's counts as if never made.
NOT_SENT = Cancelled()

Outcome = Success | Failure | Cancelled


@dataclass(slots=True, eq=False)
class AttemptTicket:
    """One attempt between ``begin`` and ``settle``: what it holds and what it found.

    ``health`` is the credential's health when the attempt began: the attempt reports a
    change of health against it. ``settled`` makes a second settle a no-op, so a lease
    and a probe are released exactly once.
    """

    candidate: Candidate
    lease: Lease
    probe: bool
    started: float
    prompt: int
    health: Health
    settled: bool = False


# ---- the core -----------------------------------------------------------------------


class RoutingCore:
    """Begins and settles attempts; owns the per-provider rotation counts.

    ``rng`` jitters backoffs; ``rotations`` (shared with the plan and the state file)
    counts the attempts sent per provider.
    """

    def __init__(self, rng: random.Random, rotations: dict[str, int] | None = None) -> None:
        self.rng = rng
        self.rotations = {} if rotations is None else rotations

    def begin(
        self, candidate: Candidate, now: float, tokens: int, prompt: int = 0
    ) -> tuple[AttemptTicket, list[Event]]:
        """Lease the candidate's credential for ``tokens`` and dispatch a call to its target.

        ``prompt`` is the estimated prompt size, which the reply's count corrects.
        """
        credential, target = candidate.credential, candidate.target
        breaker = target.breaker
        health = credential.current_health(now)
        lease = credential.lease(now, tokens, long=candidate.long)
        rotations = self.rotations
        rotations[target.provider] = rotations.get(target.provider, 0) + 1
        was = breaker.state
        probe = breaker.dispatched(now)
        events: list[Event] = []
        if breaker.state is not was:
            events.append(BreakerHalfOpen(target.name))
        return AttemptTicket(candidate, lease, probe, now, prompt, health), events

    def settle(self, ticket: AttemptTicket, outcome: Outcome, now: float) -> list[Event]:
        """Apply the outcome of the attempt to its credential, its breaker and its target.

        A cancel releases the lease and the probe and says nothing about key or target;
        a ticket settled already is left alone.
        """
        events: list[Event] = []
        if ticket.settled:
            return events
        ticket.settled = True
        credential, target = ticket.candidate.credential, ticket.candidate.target
        breaker = target.breaker
        if isinstance(outcome, Cancelled):
            if outcome is NOT_SENT:
                credential.unsend(ticket.lease)
            else:
                credential.release(ticket.lease)
            breaker.released(ticket.probe)
            return events
        requests_limit, tokens_limit = credential.requests.limit, credential.tokens.limit
        was = breaker.state
        if isinstance(outcome, Success):
            credential.succeeded(now, outcome.latency_ms, outcome.limits, ticket.lease)
            target.learn_tokens(ticket.prompt, outcome.prompt_tokens)
            breaker.succeeded(outcome.latency_ms, ticket.probe)
            reason = ""
        else:
            credential.failed(outcome, now, self.rng, ticket.lease)
            if outcome.cls is FailureClass.TARGET_DOWN:
                breaker.failed(now, ticket.probe)
            else:
                breaker.released(ticket.probe)
            reason = outcome.message
        health = credential.current_health(now)
        if health is not ticket.health:
            events.append(_health_event(credential, health, ticket.health))
        if credential.requests.limit != requests_limit or credential.tokens.limit != tokens_limit:
            _learned(credential, (requests_limit, tokens_limit), events)
        if breaker.state is not was:
            events.append(_breaker_event(target.name, breaker.state, was, breaker.until, reason))
        return events


def expire(credential: CredentialState, now: float) -> list[CredentialEvent]:
    """Fold a cooldown or a park that has run out (``current_health`` says) into the state."""
    was = credential.health
    if was is credential.current_health(now):
        return []
    credential.health = Health.READY
    credential.reason = ""
    credential.changed()
    return [CredentialReady(credential.provider, credential.label, was)]


def rule_out(candidate: Candidate, failure: Failure, exclusions: Exclusions) -> None:
    """Rule out, for this request only, what the failure says cannot serve it.

    A cooling credential needs no entry: the plan skips it until its reset anyway.
    """
    cls = failure.cls
    if cls is FailureClass.TARGET_DOWN:
        exclusions.down.add(candidate.target.name)
    elif cls is FailureClass.CONTEXT_OVERFLOW:
        if candidate.long or candidate.target.long_context_window is None:
            exclusions.targets.add(candidate.target.name)
        else:
            # Our estimate put it inside the normal window; the provider counts more.
            exclusions.long_only.add(candidate.target.name)
    elif cls in (FailureClass.QUOTA_EXHAUSTED, FailureClass.AUTH_FAILED) or (
        cls is FailureClass.RATE_LIMITED and failure.oversized
    ):
        exclusions.credentials.add((candidate.credential.provider, candidate.credential.label))


def _health_event(credential: CredentialState, health: Health, was: Health) -> CredentialEvent:
    provider, label, until, reason = (
        credential.provider,
        credential.label,
        credential.until,
        credential.reason,
    )
    if health is Health.COOLING:
        return CredentialCooled(provider, label, until, reason)
    if health is Health.PARKED:
        return CredentialParked(provider, label, until, reason)
    if health is Health.DISABLED:
        return CredentialDisabled(provider, label, until, reason)
    return CredentialReady(provider, label, was)


def _learned(
    credential: CredentialState, limits: tuple[int | None, int | None], events: list[Event]
) -> None:
    for name, window, before in (
        ("requests", credential.requests, limits[0]),
        ("tokens", credential.tokens, limits[1]),
    ):
        if window.limit is not None and window.limit != before:
            events.append(WindowLearned(credential.provider, credential.label, name, window.limit))


def _breaker_event(
    target: str, state: BreakerState, was: BreakerState, until: float, reason: str
) -> BreakerEvent:
    if state is BreakerState.OPEN:
        return BreakerOpened(target, was, until, reason)
    if state is BreakerState.CLOSED:
        return BreakerClosed(target, was)
    return BreakerSuspect(target, was, reason)

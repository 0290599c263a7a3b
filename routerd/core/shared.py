"""Facts shared between hosts that use the same keys, and how a host folds one into its state.

Pure and synchronous, like the rest of the core: a fact names a credential by provider and
key fingerprint (never the key) and carries wall-clock times, which ``apply_*`` turn into
this host's monotonic time (``now_mono`` / ``now_wall``). Each returns the events of what it
changed, as ``routing.py`` does, so logging and waking waiters work the same for a change
learned from another host as for one learned here. A fact only ever makes a credential
more careful (cooler longer, less capacity) except a "ready" or "proven" that another host
learned from the provider itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health
from routerd.core.routing import (
    BreakerClosed,
    BreakerOpened,
    CredentialCooled,
    CredentialDisabled,
    CredentialEvent,
    CredentialParked,
    CredentialReady,
)

# The order of care: a fact moves a credential only towards a more careful health, or to
# the same health for longer.
_SEVERITY = {Health.READY: 0, Health.COOLING: 1, Health.PARKED: 2, Health.DISABLED: 3}


@dataclass(frozen=True, slots=True)
class HealthFact:
    """A credential's health as one host learned it; ``until`` is wall-clock time.

    ``proven``: the provider answered this key (so other hosts need not probe it).
    """

    provider: str
    fingerprint: str
    health: Health
    until: float
    reason: str
    proven: bool = False


@dataclass(frozen=True, slots=True)
class WindowFact:
    """A provider-reported window ("requests" or "tokens") of one credential, wall-clock."""

    provider: str
    fingerprint: str
    window: str
    limit: int | None
    remaining: int
    reset_at: float
    # The longest reset a reply reported: how long the window is, at least.
    length: float = 0.0


@dataclass(frozen=True, slots=True)
class SpendFact:
    """Requests (and their tokens) one host sent on a credential, and answers it got back,
    since its last such fact: the other hosts count them in their own windows."""

    provider: str
    fingerprint: str
    sent: int = 0
    tokens_sent: int = 0
    answered: int = 0
    tokens_answered: int = 0


@dataclass(frozen=True, slots=True)
class BreakerFact:
    """A target's breaker as one host left it: open until ``until`` (wall), or closed."""

    target: str
    state: BreakerState
    until: float


def health_fact(credential: CredentialState, now_mono: float, now_wall: float) -> HealthFact:
    """What this host knows of ``credential``'s health, to share."""
    health = credential.current_health(now_mono)
    until = now_wall + (credential.until - now_mono) if health is not Health.READY else 0.0
    return HealthFact(
        credential.provider,
        credential.fingerprint,
        health,
        until,
        credential.reason if health is not Health.READY else "",
        credential.proven,
    )


def window_facts(credential: CredentialState, now_mono: float, now_wall: float) -> list[WindowFact]:
    """The credential's learned windows still running, to share."""
    facts = []
    for name, window in (("requests", credential.requests), ("tokens", credential.tokens)):
        left = window.left(now_mono)
        if left is None or now_mono >= window.reset_at:
            continue
        reset_at = now_wall + (window.reset_at - now_mono)
        facts.append(
            WindowFact(
                credential.provider,
                credential.fingerprint,
                name,
                window.limit,
                left,
                reset_at,
                window.longest_reset,
            )
        )
    return facts


def apply_health(
    credential: CredentialState, fact: HealthFact, now_mono: float, now_wall: float
) -> list[CredentialEvent]:
    """Fold another host's view of the credential's health into this host's state.

    A cooldown, park or disable that lasts longer than what this host knows is taken as
    is; "ready" lifts only a park or a disable (a cooldown runs out on its own, and a late
    "ready" must not undo a 429 this host just saw); "proven" ends the key's probation.
    """
    events: list[CredentialEvent] = []
    changed = False
    if fact.proven and not credential.proven:
        credential.proven = True
        credential.remote_probe_until = 0.0
        changed = True
    local = credential.current_health(now_mono)
    until = now_mono + (fact.until - now_wall)
    if fact.health is Health.READY:
        if local in (Health.PARKED, Health.DISABLED) and not credential.probing:
            credential.health, credential.until, credential.reason = Health.READY, 0.0, ""
            events.append(CredentialReady(credential.provider, credential.label, local))
            changed = True
    elif until > now_mono and (
        _SEVERITY[fact.health] > _SEVERITY[local]
        or (fact.health is local and until > credential.until)
    ):
        credential.health, credential.until = fact.health, until
        credential.reason = fact.reason
        if fact.health is Health.COOLING:
            credential.requests.refused(until)
        events.append(_event(credential, fact.health, until, fact.reason))
        changed = True
    if changed:
        credential.changed()
    return events


def apply_window(
    credential: CredentialState, fact: WindowFact, now_mono: float, now_wall: float
) -> bool:
    """Lower the credential's window to what another host last heard from the provider.

    Both hosts spend the same provider window, so the smaller of the two figures is the
    safe one; returns whether anything changed.
    """
    window = credential.requests if fact.window == "requests" else credential.tokens
    reset_at = now_mono + (fact.reset_at - now_wall)
    if reset_at <= now_mono:
        return False
    if fact.length > window.longest_reset:
        window.longest_reset = fact.length
    newer_wins = needs_place(credential)
    if not window.merge(fact.limit, fact.remaining, reset_at, now_mono, newer_wins=newer_wins):
        return False
    credential.changed()
    return True


def apply_spend(credential: CredentialState, fact: SpendFact, now_mono: float) -> None:
    """Count another host's requests on the credential as if this host had sent them.

    A provider window counts every host's requests, so each host's estimate of what is
    left must too: what was sent and not yet answered anywhere may be uncounted in the
    figure of the next reply.
    """
    if fact.sent:
        if needs_place(credential):
            # The ledger keeps the hosts inside the window; only the count of requests not
            # yet answered matters here (the next reply's figure may not count them).
            credential.requests.sent += fact.sent
        else:
            credential.requests.spend(fact.sent, now_mono)
    if fact.tokens_sent:
        credential.tokens.spend(fact.tokens_sent, now_mono)
    if fact.answered:
        credential.requests.answer(fact.answered)
    if fact.tokens_answered:
        credential.tokens.answer(fact.tokens_answered)
    credential.changed()


def share_windows(credentials: Iterable[CredentialState], hosts: int) -> None:
    """``hosts`` hosts (this one included) now spend these credentials' windows together."""
    for credential in credentials:
        credential.requests.hosts = credential.tokens.hosts = max(1, hosts)


def claim_probe(credential: CredentialState, until_mono: float) -> None:
    """Another host is trying this unproven key: leave it to that host until ``until_mono``."""
    if not credential.proven:
        credential.remote_probe_until = max(credential.remote_probe_until, until_mono)
        credential.changed()


def hold(credential: CredentialState, until_mono: float) -> None:
    """The fleet's requests fill this key's provider window until ``until_mono``."""
    credential.held_until = max(credential.held_until, until_mono)
    credential.changed()


def needs_place(credential: CredentialState) -> bool:
    """Whether a request on this key takes its place in the fleet's ledger before it goes.

    Only when other hosts spend the key too and a reply told its window: then each host's
    estimate lags the others' requests by the time their news takes, so only the ledger
    keeps them from overrunning the window together. A host alone pays no round trip.
    """
    return credential.requests.guarded


@dataclass(frozen=True, slots=True)
class FleetAsk:
    """What one request must find room for in a key's fleet-wide limits (0: no such limit).

    ``window_limit`` and ``window_s``: the provider window a reply told (its ledger dates
    every request anyway, ``window_s`` long); ``rpm``, ``tpm`` and ``max_concurrent``: the
    key's configured limits, which then hold for the whole fleet; ``lease_s``: how long a
    concurrency lease lasts if its host never gives it back.
    """

    window_limit: int = 0
    window_s: float = 60.0
    rpm: int = 0
    tpm: int = 0
    tokens: int = 0
    max_concurrent: int = 0
    lease_s: float = 0.0


def fleet_ask(credential: CredentialState, tokens: int, lease_s: float) -> FleetAsk | None:
    """What a request of ``tokens`` on this key asks of the fleet's ledgers before it goes;
    None when nothing does (no limit configured, and the window's ledger is not needed)."""
    window = credential.requests
    guarded = needs_place(credential)
    rpm = credential.rpm.limit if credential.rpm is not None else 0
    tpm = credential.tpm.limit if credential.tpm is not None else 0
    concurrent = credential.max_concurrent or 0
    if not (guarded or rpm or tpm or concurrent):
        return None
    return FleetAsk(
        window_limit=window.limit or 0 if guarded else 0,
        window_s=window.longest_reset or 60.0,
        rpm=rpm,
        tpm=tpm,
        tokens=tokens if tpm else 0,
        max_concurrent=concurrent,
        lease_s=lease_s,
    )


def apply_breaker(
    breaker: Breaker, fact: BreakerFact, now_mono: float, now_wall: float
) -> list[BreakerOpened | BreakerClosed]:
    """Fold another host's breaker into this host's: open it for as long, or close it.

    A half-open or suspect breaker here is left alone: its own probe decides.
    """
    was = breaker.position(now_mono)
    until = now_mono + (fact.until - now_wall)
    if fact.state is BreakerState.OPEN and until > now_mono:
        if was in (BreakerState.CLOSED, BreakerState.SUSPECT) or (
            was is BreakerState.OPEN and until > breaker.until
        ):
            breaker.state, breaker.until = BreakerState.OPEN, until
            breaker.opens = max(breaker.opens, 1)
            return [BreakerOpened(breaker.target, was, until, "opened on another host")]
    elif fact.state is BreakerState.CLOSED and was is BreakerState.OPEN:
        breaker.state, breaker.until = BreakerState.CLOSED, 0.0
        breaker.consecutive_failures = 0
        breaker.proven = True
        return [BreakerClosed(breaker.target, was)]
    return []


def _event(
    credential: CredentialState, health: Health, until: float, reason: str
) -> CredentialEvent:
    provider, label = credential.provider, credential.label
    if health is Health.COOLING:
        return CredentialCooled(provider, label, until, reason)
    if health is Health.PARKED:
        return CredentialParked(provider, label, until, reason)
    return CredentialDisabled(provider, label, until, reason)

"""Between the dispatcher and the shared state: what to share after an attempt, and how a
fact from another host reaches the credential it names.

The core stays the one place that changes state: facts are folded in by
``routerd.core.shared``, and the events it returns go to the credential's actor (its log
line) and wake the waiters, as the dispatcher does with its own events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from routerd.core import routing as core
from routerd.core.breaker import BreakerState
from routerd.core.credential import PROBATION_S, CredentialState, Health
from routerd.core.plan import Candidate, Target
from routerd.core.shared import (
    BreakerFact,
    HealthFact,
    SpendFact,
    WindowFact,
    apply_breaker,
    apply_health,
    apply_spend,
    apply_window,
    claim_probe,
    fleet_ask,
    health_fact,
    hold,
    share_windows,
    window_facts,
)
from routerd.dispatch.actor import CredentialActor
from routerd.fleet.codec import Fact

if TYPE_CHECKING:  # the Redis client is imported only when [state] uses it
    from routerd.fleet.backend import SharedState

log = structlog.get_logger("routerd.shared_state")

# A host not heard spending a provider's keys for this long no longer shares their windows.
SPENDER_IDLE_S = 10.0

# How long a request stays in a key's ledger before any reply told its window's length.
LEDGER_DEFAULT_S = 60.0

_HEALTH_EVENTS = (
    core.CredentialCooled,
    core.CredentialParked,
    core.CredentialDisabled,
    core.CredentialReady,
)


class FleetLink:
    """Shares this host's credential and breaker changes and applies the other hosts'."""

    def __init__(
        self,
        actors: Mapping[tuple[str, str], CredentialActor],
        targets: Callable[[], Mapping[str, Target]],
        *,
        on_change: Callable[[], None],
        lease_s: Callable[[str], float] = lambda provider: 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.shared: SharedState | None = None
        self._actors = actors
        self._targets = targets
        self._on_change = on_change
        self._lease_s = lease_s
        self._clock = clock
        self._wall = wall
        self._by_fingerprint: dict[tuple[str, str], CredentialActor] = {}
        self._proven_shared: set[tuple[str, str]] = set()
        # The attempts whose request the other hosts counted: their answer is told too.
        self._counted: set[int] = set()
        # The concurrency leases the fleet gave this host's attempts, by attempt.
        self._leases: dict[int, str] = {}
        # Per provider: the other hosts that spent its keys, and when this host last heard so.
        self._spending: dict[str, dict[str, float]] = {}
        self.refresh()

    def refresh(self) -> None:
        """The actors changed (a reload): look credentials up by fingerprint anew, and let
        new keys know who else spends their provider's keys."""
        self._by_fingerprint = {
            (a.state.provider, a.state.fingerprint): a for a in self._actors.values()
        }
        for provider, seen in self._spending.items():
            pool = (a.state for a in self._actors.values() if a.state.provider == provider)
            share_windows(pool, 1 + len(seen))

    def link_changed(self, up: bool) -> None:
        """The server went away (or came back): while it is away, each host's own estimate
        of a window decides again, as if it spent the key alone."""
        if not up:
            self._spending.clear()
            share_windows((a.state for a in self._actors.values()), 1)
            self._on_change()

    # ---- outgoing ---------------------------------------------------------------------

    async def begun(self, candidate: Candidate, ticket: core.AttemptTicket) -> bool:
        """An attempt holds its lease: an unproven key is tried by one host of the fleet
        first (the others wait for its verdict, or for its claim to end); any other
        attempt goes out at once, its request counted on the other hosts too."""
        shared = self.shared
        if shared is None:
            return True
        credential = candidate.credential
        if not credential.proven:
            held = await shared.claim(credential.provider, credential.fingerprint, PROBATION_S)
            if held is not None:
                claim_probe(credential, self._clock() + held)
                return False
        ask = fleet_ask(credential, ticket.lease.tokens, self._lease_s(candidate.target.provider))
        if ask is None:
            window_s = credential.requests.longest_reset or LEDGER_DEFAULT_S
            shared.record(credential.provider, credential.fingerprint, window_s)
        else:
            wait, lease = await shared.admit(credential.provider, credential.fingerprint, ask)
            if wait is not None:
                hold(credential, self._clock() + wait)
                return False
            if lease is not None:
                self._leases[id(ticket)] = lease
        shared.spend(credential.provider, credential.fingerprint, (1, ticket.lease.tokens, 0, 0))
        self._counted.add(id(ticket))
        return True

    def settled(
        self, candidate: Candidate, ticket: core.AttemptTicket, events: list[core.Event]
    ) -> None:
        """An attempt settled: share what changed of its credential and its target."""
        shared = self.shared
        if shared is None:
            return
        credential = candidate.credential
        lease = self._leases.pop(id(ticket), None)
        if lease is not None:
            shared.release(credential.provider, credential.fingerprint, lease)
        if id(ticket) in self._counted:
            self._counted.discard(id(ticket))
            tokens = ticket.lease.tokens
            shared.spend(credential.provider, credential.fingerprint, (0, 0, 1, tokens))
        now, wall = self._clock(), self._wall()
        name = (credential.provider, credential.fingerprint)
        first_proof = credential.proven and name not in self._proven_shared
        # The windows go first: a host that learns a key is proven must already know what
        # is left of it, or it would send to it as to a key of unknown limits.
        shared.windows_changed(credential.provider, credential.fingerprint)
        if first_proof or any(isinstance(e, _HEALTH_EVENTS) for e in events):
            if credential.proven:
                self._proven_shared.add(name)
            shared.publish(health_fact(credential, now, wall))
        for event in events:
            if isinstance(event, core.BreakerOpened | core.BreakerClosed):
                shared.publish(self._breaker_fact(candidate.target, now, wall))

    def _breaker_fact(self, target: Target, now: float, wall: float) -> BreakerFact:
        breaker = target.breaker
        until = wall + (breaker.until - now) if breaker.state is BreakerState.OPEN else 0.0
        return BreakerFact(target.name, breaker.state, until)

    def local_facts(self) -> list[Fact]:
        """Everything this host knows that the others should: re-published on (re)connect."""
        now, wall = self._clock(), self._wall()
        # An empty spend on each provider says "this host is about to spend its keys too".
        providers = {credential.provider for credential, _ in self._states()}
        facts: list[Fact] = [SpendFact(provider, "") for provider in sorted(providers)]
        for credential, _ in self._states():
            if credential.proven or credential.current_health(now) is not Health.READY:
                facts.append(health_fact(credential, now, wall))
            facts.extend(window_facts(credential, now, wall))
        for target in self._targets().values():
            if target.breaker.position(now) is BreakerState.OPEN:
                facts.append(self._breaker_fact(target, now, wall))
        return facts

    def _states(self) -> list[tuple[CredentialState, CredentialActor]]:
        return [(actor.state, actor) for actor in self._actors.values()]

    # ---- incoming ---------------------------------------------------------------------

    def apply(self, fact: Fact, origin: str) -> None:
        """Fold one fact from ``origin``, another host, into this host's state."""
        now, wall = self._clock(), self._wall()
        if isinstance(fact, SpendFact):
            self._spender(fact.provider, origin, now)
        if isinstance(fact, HealthFact | WindowFact | SpendFact):
            actor = self._by_fingerprint.get((fact.provider, fact.fingerprint))
            if actor is None:
                return
            if isinstance(fact, WindowFact):
                apply_window(actor.state, fact, now, wall)
                return
            if isinstance(fact, SpendFact):
                apply_spend(actor.state, fact, now)
                return
            events = apply_health(actor.state, fact, now, wall)
            if fact.proven:
                self._proven_shared.add((fact.provider, fact.fingerprint))
            for event in events:
                actor.report(event)
            self._on_change()
            return
        target = self._targets().get(fact.target)
        if target is None:
            return
        for change in apply_breaker(target.breaker, fact, now, wall):
            log.info(
                "breaker_shared",
                target=change.target,
                state=target.breaker.state.value,
                was=change.was.value,
            )
            self._on_change()

    def _spender(self, provider: str, origin: str, now: float) -> None:
        """``origin`` spends the provider's keys: count the hosts sharing its windows."""
        seen = self._spending.setdefault(provider, {})
        fresh = origin not in seen
        seen[origin] = now
        for host, at in list(seen.items()):
            if now - at > SPENDER_IDLE_S:
                del seen[host]
                fresh = True
        if fresh:
            pool = (a.state for a in self._actors.values() if a.state.provider == provider)
            share_windows(pool, 1 + len(seen))

    def windows(self, provider: str, fingerprint: str) -> list[WindowFact]:
        """A credential's learned windows as they are now, to share."""
        actor = self._by_fingerprint.get((provider, fingerprint))
        if actor is None:
            return []
        return window_facts(actor.state, self._clock(), self._wall())

"""Facts from other hosts folded into one host's state, without an event loop.

What a user of several hosts notices: a key parked, disabled or cooling on one host is
left alone by every other; a late "ready" never undoes a 429 this host just saw; a key
another host is trying first is left to it; another host's requests count in this
host's estimate of the provider's window.
"""

from __future__ import annotations

import random

from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health, LocalLimit
from routerd.core.outcome import Window
from routerd.core.plan import Candidate, Target
from routerd.core.routing import (
    NOT_SENT,
    BreakerClosed,
    BreakerOpened,
    CredentialCooled,
    CredentialDisabled,
    CredentialParked,
    CredentialReady,
    RoutingCore,
)
from routerd.core.shared import (
    BreakerFact,
    FleetAsk,
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
    needs_place,
    share_windows,
    window_facts,
)

MONO, WALL = 1000.0, 1_700_000_000.0


def key(**kw: object) -> CredentialState:
    return CredentialState("p", "a", "sha256:a", 0, proven=True, **kw)  # type: ignore[arg-type]


def fact(health: Health, in_s: float, reason: str = "", proven: bool = True) -> HealthFact:
    until = WALL + in_s if health is not Health.READY else 0.0
    return HealthFact("p", "sha256:a", health, until, reason, proven)


def test_a_park_on_another_host_parks_the_key_here_until_the_same_moment() -> None:
    credential = key()
    events = apply_health(credential, fact(Health.PARKED, 600, "quota exhausted"), MONO, WALL)
    assert events == [CredentialParked("p", "a", MONO + 600, "quota exhausted")]
    assert credential.free_at(MONO + 1, 1) == MONO + 600
    assert credential.current_health(MONO + 600) is Health.READY


def test_the_more_careful_fact_wins_and_a_shorter_one_changes_nothing() -> None:
    credential = key()
    apply_health(credential, fact(Health.DISABLED, 3600, "auth failed (401)"), MONO, WALL)
    assert apply_health(credential, fact(Health.COOLING, 5), MONO, WALL) == []
    assert credential.health is Health.DISABLED
    cooling = key()
    apply_health(cooling, fact(Health.COOLING, 5, "rate limited (429)"), MONO, WALL)
    assert apply_health(cooling, fact(Health.COOLING, 2), MONO, WALL) == []
    events = apply_health(cooling, fact(Health.COOLING, 9, "rate limited (429)"), MONO, WALL)
    assert events == [CredentialCooled("p", "a", MONO + 9, "rate limited (429)")]
    # A cooling key has no window left until its reset, here as on the host that saw it.
    assert cooling.free_at(MONO + 8, 1) >= MONO + 9


def test_ready_lifts_a_park_or_a_disable_but_never_a_cooldown() -> None:
    parked = key()
    apply_health(parked, fact(Health.PARKED, 600), MONO, WALL)
    assert apply_health(parked, fact(Health.READY, 0), MONO, WALL) == [
        CredentialReady("p", "a", Health.PARKED)
    ]
    assert parked.free_at(MONO, 1) == MONO
    cooling = key()
    apply_health(cooling, fact(Health.COOLING, 5), MONO, WALL)
    assert apply_health(cooling, fact(Health.READY, 0), MONO, WALL) == []
    assert cooling.health is Health.COOLING


def test_a_fact_already_past_changes_nothing() -> None:
    credential = key()
    assert apply_health(credential, fact(Health.PARKED, -1), MONO, WALL) == []
    assert credential.health is Health.READY


def test_a_key_another_host_tries_first_waits_for_its_verdict() -> None:
    credential = CredentialState("p", "a", "sha256:a", 0)
    claim_probe(credential, MONO + 2)
    assert credential.free_at(MONO, 1) == MONO + 2
    apply_health(credential, fact(Health.READY, 0, proven=True), MONO + 0.1, WALL + 0.1)
    assert credential.proven
    assert credential.free_at(MONO + 0.1, 1) == MONO + 0.1


def test_a_disabled_fact_reaches_a_key_another_host_is_trying() -> None:
    credential = CredentialState("p", "a", "sha256:a", 0)
    claim_probe(credential, MONO + 2)
    events = apply_health(
        credential, fact(Health.DISABLED, 3600, "auth failed (401)", proven=False), MONO, WALL
    )
    assert events == [CredentialDisabled("p", "a", MONO + 3600, "auth failed (401)")]


def test_health_fact_carries_wall_clock_times_and_no_reason_when_ready() -> None:
    credential = key()
    apply_health(credential, fact(Health.PARKED, 600, "quota exhausted"), MONO, WALL)
    shared = health_fact(credential, MONO + 10, WALL + 10)
    assert (shared.health, shared.until, shared.reason) == (
        Health.PARKED,
        WALL + 600,
        "quota exhausted",
    )
    assert health_fact(key(), MONO, WALL).until == 0.0


def learned(remaining: int, reset_s: float = 2.0) -> CredentialState:
    credential = key()
    credential.requests.learn(Window(10, remaining, reset_s), MONO, 0, 0, MONO)
    return credential


def test_a_window_figure_fills_a_window_this_host_knows_nothing_of() -> None:
    credential = key()
    source = learned(4)
    (shared, *_) = window_facts(source, MONO, WALL)
    assert apply_window(credential, shared, MONO, WALL)
    assert credential.requests.left(MONO) == 4
    assert credential.requests.limit == 10


def test_a_running_estimate_is_kept_and_its_reset_moves_later() -> None:
    credential = learned(6, reset_s=1.0)
    later = WindowFact("p", "sha256:a", "requests", 10, 9, WALL + 3.0, 2.0)
    assert apply_window(credential, later, MONO, WALL)
    assert credential.requests.left(MONO) == 6
    assert credential.requests.reset_at == MONO + 3.0
    assert credential.requests.longest_reset == 2.0


def test_another_hosts_requests_count_in_this_hosts_window() -> None:
    credential = learned(5)
    apply_spend(credential, SpendFact("p", "sha256:a", sent=3, tokens_sent=30), MONO)
    assert credential.requests.left(MONO) == 2
    # A reply to a request this host sent before the others answered may not count theirs.
    mark = credential.requests.spend(1, MONO)
    credential.requests.learn(Window(10, 4, 2.0), MONO + 0.01, mark, 1, MONO)
    assert credential.requests.left(MONO + 0.01) == 1


def test_the_ledger_is_asked_only_when_other_hosts_spend_a_window_a_reply_told() -> None:
    alone = learned(5)
    assert not needs_place(alone)
    share_windows([alone], 2)
    assert needs_place(alone)
    unknown = key()
    share_windows([unknown], 2)
    assert not needs_place(unknown)


def test_a_breaker_opened_elsewhere_opens_here_and_closes_with_it() -> None:
    breaker = Breaker("p/m")
    opened = apply_breaker(breaker, BreakerFact("p/m", BreakerState.OPEN, WALL + 5), MONO, WALL)
    assert opened == [BreakerOpened("p/m", BreakerState.CLOSED, MONO + 5, "opened on another host")]
    assert not breaker.admits(MONO + 1)
    closed = apply_breaker(breaker, BreakerFact("p/m", BreakerState.CLOSED, 0.0), MONO + 1, WALL)
    assert closed == [BreakerClosed("p/m", BreakerState.OPEN)]
    assert breaker.admits(MONO + 1)


def test_the_fleet_is_asked_only_for_limits_that_apply() -> None:
    assert fleet_ask(key(), 100, 60.0) is None
    capped = key(max_concurrent=2, rpm=LocalLimit(5))
    ask = fleet_ask(capped, 100, 60.0)
    assert ask == FleetAsk(window_limit=0, rpm=5, max_concurrent=2, lease_s=60.0)
    guarded = learned(5)
    share_windows([guarded], 2)
    ask = fleet_ask(guarded, 100, 60.0)
    assert ask is not None and (ask.window_limit, ask.window_s) == (10, 2.0)


def test_a_request_the_fleet_refused_is_taken_back_from_the_keys_counts() -> None:
    core = RoutingCore(random.Random(0))
    credential = learned(5)
    credential.rpm = LocalLimit(2)
    target = Target("p/m", "p", "m", "openai", "headroom", Breaker("p/m"), [credential])
    candidate = Candidate(target, credential)
    ticket, _ = core.begin(candidate, MONO, 10)
    assert (credential.in_flight, credential.requests.left(MONO), credential.rpm.total) == (1, 4, 1)
    core.settle(ticket, NOT_SENT, MONO)
    assert (credential.in_flight, credential.requests.left(MONO), credential.rpm.total) == (0, 5, 0)
    assert credential.requests.sent == 0

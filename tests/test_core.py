"""The routing core without an event loop: each attempt begun and settled on a fake clock.

What a user notices: a key that hit its limit is left alone until its reset and the log
says so once; a dead target is opened once per outage, however many calls were in flight;
a client that hangs up frees its key and its target's probe, exactly once.
"""

from __future__ import annotations

import random

import pytest

from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health
from routerd.core.outcome import Failure, FailureClass, RateLimitReport, Window
from routerd.core.plan import Candidate, Exclusions, Target
from routerd.core.routing import (
    CANCELLED,
    BreakerClosed,
    BreakerHalfOpen,
    BreakerOpened,
    BreakerSuspect,
    CredentialCooled,
    CredentialDisabled,
    CredentialParked,
    CredentialReady,
    RoutingCore,
    Success,
    WindowLearned,
    expire,
    rule_out,
)

T0 = 1000.0


def setup(
    *, proven: bool = True, threshold: int = 3
) -> tuple[RoutingCore, Candidate, CredentialState, Breaker]:
    key = CredentialState("p", "a", "sha256:a", 0, proven=proven)
    breaker = Breaker("p/m", failure_threshold=threshold, open_s=5.0, proven=proven)
    target = Target("p/m", "p", "m", "openai", "fill_first", breaker, [key])
    return RoutingCore(random.Random(7)), Candidate(target, key), key, breaker


def failure(cls: FailureClass, retry_after: float | None = None, status: int = 429) -> Failure:
    return Failure(cls, f"{cls.value} upstream", status, retry_after)


def test_a_success_counts_the_use_and_releases_the_lease() -> None:
    core, candidate, key, breaker = setup()
    ticket, events = core.begin(candidate, T0, 100)
    assert events == []
    assert (key.in_flight, key.uses, core.rotations) == (1, 1, {"p": 1})
    assert not ticket.probe  # a proven, closed breaker lets calls flow
    assert core.settle(ticket, Success(40.0), T0 + 0.04) == []
    assert (key.in_flight, key.successes, key.latency_ms) == (0, 1, 40.0)
    assert (breaker.successes, breaker.state) == (1, BreakerState.CLOSED)


def test_a_success_teaches_the_windows_once_and_the_token_estimate() -> None:
    core, candidate, key, _ = setup()
    limits = RateLimitReport(requests=Window(100, 98, 60.0), tokens=Window(10_000, 9_000, 60.0))
    ticket, _ = core.begin(candidate, T0, 1000, prompt=1000)
    assert core.settle(ticket, Success(10.0, limits, prompt_tokens=2000), T0 + 1) == [
        WindowLearned("p", "a", "requests", 100),
        WindowLearned("p", "a", "tokens", 10_000),
    ]
    assert key.requests.left(T0 + 1) == 98
    assert candidate.target.token_scale == pytest.approx(1.2)
    ticket, _ = core.begin(candidate, T0 + 2, 10)
    assert core.settle(ticket, Success(10.0, limits), T0 + 3) == []  # nothing new learned


def test_a_rate_limit_cools_the_key_until_the_providers_reset_and_spares_the_target() -> None:
    core, candidate, key, breaker = setup()
    ticket, _ = core.begin(candidate, T0, 10)
    events = core.settle(ticket, failure(FailureClass.RATE_LIMITED, 2.5), T0 + 0.5)
    assert events == [CredentialCooled("p", "a", T0 + 3.0, "rate limited (429)")]
    assert key.current_health(T0 + 2.9) is Health.COOLING
    assert key.current_health(T0 + 3.0) is Health.READY
    assert (key.in_flight, breaker.failures, breaker.state) == (0, 0, BreakerState.CLOSED)


def test_two_rate_limits_in_flight_each_report_the_cooldown_they_set() -> None:
    core, candidate, key, _ = setup()
    first, _ = core.begin(candidate, T0, 10)
    second, _ = core.begin(candidate, T0, 10)
    assert core.settle(first, failure(FailureClass.RATE_LIMITED, 1.0), T0) == [
        CredentialCooled("p", "a", T0 + 1.0, "rate limited (429)")
    ]
    assert core.settle(second, failure(FailureClass.RATE_LIMITED, 4.0), T0 + 0.5) == [
        CredentialCooled("p", "a", T0 + 4.5, "rate limited (429)")
    ]
    assert key.in_flight == 0


def test_quota_parks_the_key_and_auth_disables_it_until_a_probe_succeeds() -> None:
    core, candidate, key, _ = setup()
    key.quota_park_s, key.auth_probe_s = 3600.0, 600.0
    ticket, _ = core.begin(candidate, T0, 10)
    assert core.settle(ticket, failure(FailureClass.QUOTA_EXHAUSTED), T0) == [
        CredentialParked("p", "a", T0 + 3600.0, "quota exhausted")
    ]
    later = T0 + 3600.0
    ticket, _ = core.begin(candidate, later, 10)
    assert core.settle(ticket, failure(FailureClass.AUTH_FAILED, status=401), later) == [
        CredentialDisabled("p", "a", later + 600.0, "auth failed (401)")
    ]
    probe_at = later + 600.0
    ticket, _ = core.begin(candidate, probe_at, 10)
    assert key.probing and key.free_at(probe_at, 10) == float("inf")
    assert core.settle(ticket, Success(30.0), probe_at + 0.03) == [
        CredentialReady("p", "a", Health.DISABLED)
    ]
    assert (key.health, key.reason, key.probing) == (Health.READY, "", False)


def test_target_down_makes_the_breaker_suspect_then_opens_it_at_the_threshold() -> None:
    core, candidate, key, breaker = setup()
    down = failure(FailureClass.TARGET_DOWN, status=503)
    tickets = [core.begin(candidate, T0, 10)[0] for _ in range(3)]
    assert core.settle(tickets[0], down, T0 + 1) == [
        BreakerSuspect("p/m", BreakerState.CLOSED, "target_down upstream")
    ]
    assert core.settle(tickets[1], down, T0 + 1) == []  # still suspect: nothing new
    assert core.settle(tickets[2], down, T0 + 2) == [
        BreakerOpened("p/m", BreakerState.SUSPECT, T0 + 7.0, "target_down upstream")
    ]
    assert not breaker.admits(T0 + 6.9)
    assert key.health is Health.READY and key.in_flight == 0  # the key is not to blame


def test_the_half_open_probe_is_announced_and_its_success_closes_the_breaker() -> None:
    core, candidate, _, breaker = setup(threshold=1)
    ticket, _ = core.begin(candidate, T0, 10)
    core.settle(ticket, failure(FailureClass.TARGET_DOWN, status=503), T0)
    assert breaker.position(T0 + 5.0) is BreakerState.HALF_OPEN
    ticket, events = core.begin(candidate, T0 + 5.0, 10)
    assert events == [BreakerHalfOpen("p/m")]
    assert ticket.probe and breaker.probes_in_flight == 1
    assert core.settle(ticket, Success(20.0), T0 + 5.1) == [
        BreakerClosed("p/m", BreakerState.HALF_OPEN)
    ]
    assert breaker.probes_in_flight == 0 and breaker.admits(T0 + 5.1)


def test_a_failure_after_another_attempt_opened_the_breaker_does_not_extend_it() -> None:
    core, candidate, _, breaker = setup()
    down = failure(FailureClass.TARGET_DOWN, status=503)
    tickets = [core.begin(candidate, T0, 10)[0] for _ in range(3)]
    core.settle(tickets[0], down, T0)
    assert breaker.position(T0) is BreakerState.SUSPECT
    suspect_probe, _ = core.begin(candidate, T0, 10)
    assert suspect_probe.probe
    core.settle(tickets[1], down, T0)
    assert core.settle(tickets[2], down, T0)[0] == BreakerOpened(
        "p/m", BreakerState.SUSPECT, T0 + 5.0, "target_down upstream"
    )
    # The probe sent while suspect fails after the breaker opened: old news, no event.
    assert core.settle(suspect_probe, down, T0 + 1.0) == []
    assert (breaker.until, breaker.opens, breaker.probes_in_flight) == (T0 + 5.0, 1, 0)
    assert breaker.admits(T0 + 5.0)


def test_a_cancel_releases_the_lease_and_the_probe_exactly_once() -> None:
    core, candidate, key, breaker = setup()
    breaker.state = BreakerState.SUSPECT  # every call is a probe: two can be counted
    mine, _ = core.begin(candidate, T0, 300)
    other, _ = core.begin(candidate, T0, 300)
    assert (key.in_flight, breaker.probes_in_flight) == (2, 2)
    assert core.settle(mine, CANCELLED, T0 + 0.2) == []
    assert core.settle(mine, CANCELLED, T0 + 0.3) == []
    assert core.settle(mine, Success(5.0), T0 + 0.4) == []  # settled: no second verdict
    assert (key.in_flight, breaker.probes_in_flight) == (1, 1)
    assert (key.requests.answered, key.tokens.answered) == (1, 300)
    # A cancel is no verdict: neither counted against the key nor for the target.
    assert (key.successes, key.failures, breaker.successes, breaker.failures) == (0, 0, 0, 0)
    assert breaker.state is BreakerState.SUSPECT
    assert core.settle(other, Success(5.0), T0 + 0.5) == [
        BreakerClosed("p/m", BreakerState.SUSPECT)
    ]
    assert (key.in_flight, breaker.probes_in_flight) == (0, 0)


def test_a_cancelled_long_request_frees_the_long_lane_too() -> None:
    core, candidate, key, _ = setup(proven=False)
    long = Candidate(candidate.target, key, long=True)
    ticket, _ = core.begin(long, T0, 300_000)
    assert (key.in_flight, key.long_in_flight) == (1, 1)
    core.settle(ticket, CANCELLED, T0 + 1)
    assert (key.in_flight, key.long_in_flight) == (0, 0)
    assert key.free_at(T0 + 1, 300_000, long=True) == T0 + 1


def test_a_run_out_cooldown_is_ready_before_the_timer_and_expire_only_tidies_it() -> None:
    core, candidate, key, _ = setup()
    ticket, _ = core.begin(candidate, T0, 10)
    core.settle(ticket, failure(FailureClass.RATE_LIMITED, 2.0), T0)
    assert expire(key, T0 + 1.9) == []
    assert key.health is Health.COOLING
    assert key.current_health(T0 + 2.0) is Health.READY  # the plan needs no timer
    assert expire(key, T0 + 2.0) == [CredentialReady("p", "a", Health.COOLING)]
    assert (key.health, key.reason) == (Health.READY, "")
    assert expire(key, T0 + 3.0) == []


def test_a_failure_rules_out_for_this_request_only_what_it_blames() -> None:
    _, candidate, _, _ = setup()
    exclusions = Exclusions()
    rule_out(candidate, failure(FailureClass.RATE_LIMITED, 1.0), exclusions)
    assert not exclusions.credentials  # cooling: the plan waits for its reset
    rule_out(candidate, failure(FailureClass.QUOTA_EXHAUSTED), exclusions)
    assert exclusions.credentials == {("p", "a")}
    rule_out(candidate, failure(FailureClass.TARGET_DOWN, status=503), exclusions)
    assert exclusions.down == {"p/m"}

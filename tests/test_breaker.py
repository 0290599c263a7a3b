"""A target's breaker on an injected clock: one outage is one episode, however busy the route."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from routerd.core.breaker import Breaker, BreakerState

OPEN_S = 5.0
MAX_OPEN_S = 120.0


@dataclass
class Clock:
    """Monotonic time the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def warm_breaker() -> Breaker:
    """A breaker on a target that has answered before, so calls flow without probation."""
    return Breaker("p/m", failure_threshold=3, open_s=OPEN_S, max_open_s=MAX_OPEN_S, proven=True)


def open_with_calls_in_flight(breaker: Breaker, clock: Clock, in_flight: int) -> list[bool]:
    """Send ``in_flight`` calls on a closed breaker; returns their probe flags."""
    assert breaker.position(clock()) is BreakerState.CLOSED
    return [breaker.dispatched(clock()) for _ in range(in_flight)]


def test_calls_in_flight_when_the_breaker_opens_do_not_keep_it_open() -> None:
    clock = Clock()
    breaker = warm_breaker()
    probes = open_with_calls_in_flight(breaker, clock, 50)
    assert not any(probes)
    opened_at = None
    for probe in probes:
        clock.advance(0.02)  # the 503s come back over one second
        breaker.failed(clock(), probe)
        if opened_at is None and breaker.state is BreakerState.OPEN:
            opened_at = clock()
    assert opened_at is not None
    # Opened once, by the third failure, for open_s; the other 47 failures changed nothing.
    assert breaker.opens == 1
    assert breaker.until == pytest.approx(opened_at + OPEN_S)
    assert breaker.position(opened_at + OPEN_S - 0.01) is BreakerState.OPEN
    assert breaker.admits(opened_at + OPEN_S)
    assert breaker.free_at(clock()) == pytest.approx(opened_at + OPEN_S)


def test_a_short_outage_is_served_again_within_one_probe_interval() -> None:
    """The measured defect: a 1 s burst of 503s under 50 calls kept a route down for 119 s."""
    clock = Clock(0.0)
    breaker = warm_breaker()
    outage_ends = 1.0
    in_flight = open_with_calls_in_flight(breaker, clock, 50)
    served_at = None
    # Every 10 ms: the next call in flight fails (while the outage lasts), then the route
    # sends a call if the breaker lets it; the upstream answers at once.
    while served_at is None and clock() < 200.0:
        now = clock.advance(0.01)
        if in_flight:
            breaker.failed(now, in_flight.pop())
        if breaker.admits(now):
            probe = breaker.dispatched(now)
            if now < outage_ends:
                breaker.failed(now, probe)
            else:
                breaker.succeeded(5.0, probe)
                served_at = now
    assert served_at is not None
    assert served_at <= outage_ends + OPEN_S
    assert breaker.position(served_at) is BreakerState.CLOSED


def test_failures_while_the_half_open_probe_runs_do_not_reopen_the_breaker() -> None:
    clock = Clock()
    breaker = warm_breaker()
    late = open_with_calls_in_flight(breaker, clock, 5)
    for probe in late[:3]:
        breaker.failed(clock(), probe)
    assert breaker.position(clock()) is BreakerState.OPEN
    half_open_at = clock.advance(OPEN_S)
    probe = breaker.dispatched(half_open_at)
    assert probe and breaker.position(half_open_at) is BreakerState.HALF_OPEN
    # Two calls sent before the breaker opened fail only now (a slow upstream timeout).
    for stale in late[3:]:
        breaker.failed(clock.advance(0.5), stale)
    assert breaker.position(clock()) is BreakerState.HALF_OPEN
    assert breaker.opens == 1
    assert not breaker.admits(clock())  # still one probe at a time
    breaker.succeeded(10.0, probe)
    assert breaker.position(clock()) is BreakerState.CLOSED and breaker.admits(clock())


def test_a_late_failure_after_the_open_time_ran_out_lets_the_probe_go_at_once() -> None:
    clock = Clock()
    breaker = warm_breaker()
    calls = open_with_calls_in_flight(breaker, clock, 4)
    for probe in calls[:3]:
        breaker.failed(clock(), probe)
    clock.advance(OPEN_S + 1.0)
    breaker.failed(clock(), calls[3])  # no probe was sent yet: this call is older news
    assert breaker.position(clock()) is BreakerState.HALF_OPEN
    assert breaker.admits(clock())


def test_a_suspect_probe_failing_after_the_breaker_opened_does_not_extend_it() -> None:
    clock = Clock()
    breaker = warm_breaker()
    calls = open_with_calls_in_flight(breaker, clock, 3)
    breaker.failed(clock(), calls[0])
    assert breaker.position(clock()) is BreakerState.SUSPECT
    suspect_probe = breaker.dispatched(clock())
    assert suspect_probe
    for probe in calls[1:]:
        breaker.failed(clock(), probe)
    opened_until = breaker.until
    breaker.failed(clock.advance(1.0), suspect_probe)
    assert breaker.until == opened_until and breaker.opens == 1
    assert breaker.admits(opened_until)


def test_a_suspect_target_takes_no_new_call_while_earlier_calls_are_still_out() -> None:
    # The calls already out probe the target: a fifth call sent when the first of four
    # failed would be one more request lost to an outage (a warm daemon's outage test saw it).
    clock = Clock()
    breaker = warm_breaker()
    calls = open_with_calls_in_flight(breaker, clock, 4)
    breaker.failed(clock(), calls[0])
    assert breaker.position(clock()) is BreakerState.SUSPECT
    assert not breaker.admits(clock())
    breaker.succeeded(10.0, calls[1])
    breaker.failed(clock(), calls[2])
    assert not breaker.admits(clock())
    breaker.released(calls[3])
    assert breaker.position(clock()) is BreakerState.SUSPECT
    assert breaker.admits(clock()) and breaker.free_at(clock()) == clock()


def test_each_failed_half_open_probe_doubles_the_open_time_up_to_the_cap() -> None:
    clock = Clock()
    breaker = Breaker("p/m", failure_threshold=1, open_s=OPEN_S, max_open_s=30.0, proven=True)
    breaker.failed(clock(), breaker.dispatched(clock()))
    open_times = [breaker.until - clock()]
    for _ in range(4):
        clock.now = breaker.until
        probe = breaker.dispatched(clock())
        assert probe
        breaker.failed(clock(), probe)
        open_times.append(breaker.until - clock())
    assert open_times == pytest.approx([5.0, 10.0, 20.0, 30.0, 30.0])
    clock.now = breaker.until
    breaker.succeeded(10.0, breaker.dispatched(clock()))
    # The next outage is a new episode: it starts again at open_s.
    breaker.failed(clock(), breaker.dispatched(clock()))
    assert breaker.until - clock() == pytest.approx(OPEN_S)


def test_failures_below_the_threshold_leave_the_target_usable() -> None:
    clock = Clock()
    breaker = warm_breaker()
    breaker.failed(clock(), breaker.dispatched(clock()))
    breaker.failed(clock(), breaker.dispatched(clock()))
    assert breaker.position(clock()) is BreakerState.SUSPECT
    assert breaker.admits(clock())
    breaker.succeeded(10.0, breaker.dispatched(clock()))
    assert breaker.position(clock()) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_a_long_dead_target_keeps_its_capped_open_time_without_overflowing() -> None:
    # A target that stayed dead for days (or a state file from a runaway breaker) has
    # counted many openings; a failed probe still opens it for max_open_s.
    clock = Clock()
    breaker = warm_breaker()
    breaker.state, breaker.until, breaker.opens = BreakerState.OPEN, clock(), 5000
    probe = breaker.dispatched(clock())
    breaker.failed(clock(), probe)
    assert breaker.position(clock()) is BreakerState.OPEN
    assert breaker.until - clock() == pytest.approx(MAX_OPEN_S)

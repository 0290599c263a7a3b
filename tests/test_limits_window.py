"""A sliding window's capacity as it frees: each share comes back a window after its send."""

from __future__ import annotations

import heapq
import math
import random

import pytest

from routerd.core.credential import CredentialState, Lease
from routerd.core.limits import anthropic_limits
from routerd.core.outcome import Failure, FailureClass, RateLimitReport, Window
from routerd.core.poolindex import INDEX_MIN, PoolIndex, rest_until
from routerd.core.window import LearnedWindow
from routerd.mock.anthropic_headers import format_rfc3339
from routerd.mock.limits import SlidingWindow, ceil_ms

LIMIT = 3
LENGTH = 2.0
LATENCY = 0.01


def cred(label: str = "a") -> CredentialState:
    return CredentialState("p", label, f"sha256:{label}", 0, proven=True)


def provider_reply(provider: SlidingWindow, at: float) -> RateLimitReport:
    """What the mock provider says about its window at ``at``, reset rounded up to the ms."""
    state = provider.state(at)
    return RateLimitReport(
        requests=Window(state.limit, state.remaining, ceil_ms(state.reset_s) / 1000)
    )


def spend_window(c: CredentialState, provider: SlidingWindow, sends: list[float]) -> None:
    """Send at each of ``sends``; the provider counts it then, its reply comes LATENCY later."""
    for at in sends:
        lease = c.lease(at, 1)
        assert provider.wait_for(1, at) == 0
        provider.add(1, at)
        c.succeeded(at + LATENCY, 5.0, provider_reply(provider, at), lease)


def test_a_spent_sliding_window_frees_its_oldest_share_first() -> None:
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    spend_window(c, provider, [0.0, 0.5, 1.0])
    assert c.requests.left(1.1) == 0
    # The share taken at 0.0 leaves the provider's window at 2.0; the reset (3.0) is when
    # the last one leaves. Before: the key waited for the reset, a third of a window idle.
    assert c.free_at(1.1, 1) == pytest.approx(LENGTH + LATENCY)
    assert c.free_at(1.1, 1) < c.requests.reset_at
    assert provider.wait_for(1, c.free_at(1.1, 1)) == 0  # the provider agrees it is free


def test_shares_come_back_one_by_one_and_the_provider_never_refuses_them() -> None:
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    spend_window(c, provider, [0.0, 0.5, 1.0])
    assert c.requests.left(2.02) == 1
    assert c.requests.left(2.52) == 2
    assert c.requests.left(3.02) == 3
    # Taking the first freed share waits again for the next one, at 0.5 + LENGTH.
    spend_window(c, provider, [2.02])
    assert c.requests.free_at(2, 2.1) == pytest.approx(1.0 + LENGTH + LATENCY)


def test_a_saturated_key_serves_its_window_in_full_without_a_429() -> None:
    """Requests arrive faster than the key's window allows: it sends each as a share frees."""
    c, provider = cred(), SlidingWindow(10, LENGTH)
    replies: list[tuple[float, int, Lease, RateLimitReport]] = []
    served = pending = 0
    now, arrival, end = 0.0, 0.0, 20.0
    while now < end:
        while replies and replies[0][0] <= now:
            at, _, lease, report = heapq.heappop(replies)
            c.succeeded(at, 5.0, report, lease)
        while arrival <= now:
            pending, arrival = pending + 1, arrival + 0.05
        if pending and c.free_at(now, 1) <= now:
            lease = c.lease(now, 1)
            assert provider.wait_for(1, now) == 0, f"the provider refuses at {now}"
            provider.add(1, now)
            served, pending = served + 1, pending - 1
            heapq.heappush(replies, (now + LATENCY, served, lease, provider_reply(provider, now)))
            continue
        wakes = [arrival, *(r[0] for r in replies[:1])]
        if pending:
            wakes.append(c.free_at(now, 1))
        now = min(wakes)
    # Ten per window over ten windows; only the replies' latency is lost to inferring.
    assert served >= 0.98 * 10 * (end / LENGTH)


def test_a_share_counted_late_comes_back_as_late() -> None:
    # The request waited 0.3 s before the provider counted it: its share leaves at 2.3,
    # which its reply's reset (read at 0.31) tells; its send time would say 2.0, a 429.
    c, provider = cred(), SlidingWindow(1, LENGTH)
    lease = c.lease(0.0, 1)
    provider.add(1, 0.3)
    c.succeeded(0.31, 5.0, provider_reply(provider, 0.3), lease)
    assert c.free_at(0.5, 1) == pytest.approx(2.31)
    assert provider.wait_for(1, c.free_at(0.5, 1)) == 0


def test_a_reply_cannot_show_a_share_freed_twice() -> None:
    c, provider = cred(), SlidingWindow(2, LENGTH)
    first = c.lease(0.0, 1)
    provider.add(1, 0.0)
    c.succeeded(0.1, 5.0, provider_reply(provider, 0.0), first)  # a slow reply: back at 2.1
    spend_window(c, provider, [1.0])
    # At 2.05 the provider already let the first share go; we credit it back at 2.1. The
    # report must not hand it back a second time, or a share still counted would be sent.
    c.learn(provider_reply(provider, 2.05), 2.05)
    assert c.requests.left(2.05) == 0
    assert c.requests.left(2.2) == 1
    assert provider.wait_for(1, 2.2) == 0 and provider.wait_for(2, 2.2) > 0


def test_a_reply_without_its_send_time_keeps_waiting_for_the_reset() -> None:
    c = cred()
    c.lease(0.0, 1)
    c.learn(RateLimitReport(requests=Window(1, 0, 2.0)), 0.01)
    assert c.free_at(0.5, 1) == pytest.approx(2.01)


def test_a_429_forgets_the_sends_and_waits_for_the_reset() -> None:
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    spend_window(c, provider, [0.0, 0.5])
    lease = c.lease(1.0, 1)
    # Someone else took the last share: the provider refuses ours and says when it is whole.
    full = RateLimitReport(requests=Window(LIMIT, 0, 1.5))
    failure = Failure(FailureClass.RATE_LIMITED, "429", 429, retry_after=0.5, limits=full)
    c.failed(failure, 1.01, random.Random(0), lease)
    # The reset, not the first send's 2.01 (nor the refused one's: it may have been counted).
    assert c.free_at(1.6, 1) == c.requests.reset_at >= 2.51


def test_the_pool_index_wakes_a_spent_key_when_its_oldest_share_frees() -> None:
    pool = [cred(f"k{i}") for i in range(INDEX_MIN)]
    spent, provider = pool[0], SlidingWindow(LIMIT, LENGTH)
    spend_window(spent, provider, [0.0, 0.5, 1.0])
    index = PoolIndex(pool, "headroom")
    index.rebuild(1.1)
    assert rest_until(spent, 1.1) == pytest.approx(LENGTH + LATENCY)
    assert 0 not in index.key_of  # resting
    index.refresh(LENGTH + LATENCY)
    assert 0 in index.key_of  # placed back among the ready when its first share freed
    assert index.keys[-1][0] == pytest.approx(-1 / LIMIT)  # with a third of its window


def test_what_may_have_left_is_kept_as_the_shares_come_and_go() -> None:
    """The running sum equals the sum over the waiting shares, through growing windows,
    shares credited back and a 429, at every reply."""
    rng = random.Random(7)
    w = LearnedWindow()
    now = 0.0
    for step in range(3000):
        now += rng.uniform(0.0, 0.02)
        mark = w.spend(1, now)
        w.answer(1)
        if step % 997 == 996:
            w.refused(now + 1.0)
            continue
        reset = rng.choice([0.5, 1.0, 1.0, 1.0, 2.0 if step > 1500 else 1.0])
        # Replies arrive in time order; each request was sent a little before its reply.
        sent = now - rng.uniform(0.0, 0.05)
        w.learn(Window(limit=100, remaining=50, reset_s=reset), now, mark, 1, sent_at=sent)
        shortest = w.shortest_length
        expected = sum(a for _, at, a, _ in w.frees if at + shortest <= now)
        assert w._maybe_freed(now) == expected


def test_requests_still_in_flight_when_the_window_resets_count_in_the_new_one() -> None:
    # At the reset the window is whole only of what the provider had counted by the last
    # reply: a request sent after it, still unanswered, stays in the provider's window.
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    spend_window(c, provider, [0.0, 0.5, 1.0])
    slow = c.lease(2.02, 1)  # the share of 0.0 came back; this reply takes a while
    assert provider.wait_for(1, 2.02) == 0
    provider.add(1, 2.02)
    now = c.requests.reset_at + 0.01
    sent = 0
    while c.free_at(now, 1) <= now and sent < LIMIT + 2:
        c.lease(now, 1)
        assert provider.wait_for(1, now) == 0, f"the provider refuses send {sent + 1}"
        provider.add(1, now)
        sent += 1
    assert sent == LIMIT - 1
    c.succeeded(now + 0.5, 5.0, provider_reply(provider, now + 0.5), slow)


def test_a_reply_read_after_the_reset_does_not_take_back_a_share_that_left_since() -> None:
    # ``slow`` is sent as the first share comes back and counted beside two older shares
    # that leave at 2.05; its reply, read after the reset its window was dated (2.06), says
    # nothing is left: true when it was counted, stale now. ``late`` took one of the places
    # freed since, so one is left. Taking the stale figure alone lost that place until the
    # share of ``slow`` came back, two seconds later (the pool test's extra window).
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    spend_window(c, provider, [0.0])
    first, second = c.lease(0.05, 1), c.lease(0.05, 1)
    provider.add(1, 0.05)
    provider.add(1, 0.05)
    c.succeeded(0.055, 5.0, provider_reply(provider, 0.05), first)  # back at 2.055
    c.succeeded(0.06, 5.0, provider_reply(provider, 0.05), second)  # back at 2.06
    assert c.requests.reset_at == pytest.approx(2.06)
    assert c.free_at(2.02, 1) == 2.02  # the share of 0.0 is back (at 2.01)
    slow = c.lease(2.02, 1)
    provider.add(1, 2.02)
    stale = provider_reply(provider, 2.02)
    assert stale.requests is not None and stale.requests.remaining == 0
    assert c.free_at(2.056, 1) == 2.056
    c.lease(2.056, 1)  # late: before the reset, so nothing rolls the window over
    provider.add(1, 2.056)
    c.succeeded(2.07, 5.0, stale, slow)
    assert c.requests.left(2.07) == 1
    assert c.free_at(2.07, 1) == 2.07
    assert provider.wait_for(1, 2.07) == 0  # the provider agrees: one place is free


def whole_second_reply(
    provider: SlidingWindow, counted: float, read: float, wall: float
) -> RateLimitReport:
    """The reply as Anthropic writes it: its reset an instant in whole seconds, rounded up,
    read ``read - counted`` later; ``wall`` is the Unix time at ``now`` 0."""
    state = provider.state(counted)
    reset = format_rfc3339(counted + wall + state.reset_s)
    headers = {
        "anthropic-ratelimit-requests-limit": str(state.limit),
        "anthropic-ratelimit-requests-remaining": str(state.remaining),
        "anthropic-ratelimit-requests-reset": reset,
    }
    return anthropic_limits(headers, read + wall)


def test_resets_in_whole_seconds_never_send_into_a_full_window() -> None:
    """A reset of 2.9 s in whole seconds belongs to a 2 s window. Were it taken as the
    window's length, a reply that already counts a share freed (which we credit back only
    at its reset) would hand that share out twice: a 429. 19 of these 300 runs of 60
    requests, each with its own timing, met one that way."""
    refused = [seed for seed in range(300) if not callers_keep_to_the_window(seed)]
    assert refused == []


def callers_keep_to_the_window(seed: int) -> bool:
    """Whether 60 requests of three callers on one key all fit the provider's window."""
    rng = random.Random(seed)
    wall = 1_700_000_000 + rng.random()  # where the whole seconds fall
    c, provider = cred(), SlidingWindow(LIMIT, LENGTH)
    # (when, order, what, lease, when sent or counted): the provider counting a request,
    # or its reply being read; each takes up to 0.1-0.15 s, most often a few ms.
    events: list[tuple[float, int, str, Lease, float]] = []
    order, now, idle, sent = 0, 0.0, 3, 0
    while sent < 60 or events:
        known = c.requests.remaining is not None
        # Three callers send whenever the key says a request fits; the first goes alone.
        while idle and sent < 60 and (known or sent == 0) and c.free_at(now, 1) <= now:
            lease = c.lease(now, 1)
            idle, sent, order = idle - 1, sent + 1, order + 1
            delay = rng.uniform(0.0, 0.02) * rng.choice([0.1, 1.0, 5.0])
            heapq.heappush(events, (now + delay, order, "counted", lease, now))
        wake = c.free_at(now, 1) if idle and known and sent < 60 else math.inf
        if wake < (events[0][0] if events else math.inf):
            now = wake
            continue
        now, _, what, lease, at = heapq.heappop(events)
        if what == "counted":
            if provider.wait_for(1, now) > 0:
                return False
            provider.add(1, now)
            order += 1
            read = now + rng.uniform(0.0, 0.03) * rng.choice([0.1, 1.0, 5.0])
            heapq.heappush(events, (read, order, "read", lease, now))
        else:
            c.succeeded(now, 5.0, whole_second_reply(provider, at, now, wall), lease)
            idle += 1
    return True

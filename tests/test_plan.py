"""The routing core without an event loop: credentials, breakers and the plan, on a fake clock."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from routerd import state as state_file
from routerd.core.breaker import Breaker, BreakerState
from routerd.core.credential import CredentialState, Health, LocalLimit
from routerd.core.outcome import Failure, FailureClass, RateLimitReport, Window
from routerd.core.plan import Exclusions, Target, order_pool, plan

RNG = random.Random(7)


def cred(label: str, order: int = 0, provider: str = "p", **kw: object) -> CredentialState:
    return CredentialState(provider, label, f"sha256:{label}", order, **kw)  # type: ignore[arg-type]


def target(
    name: str, pool: list[CredentialState], strategy: str = "headroom", **kw: object
) -> Target:
    provider, _, model = name.partition("/")
    return Target(
        name=name,
        provider=provider,
        model=model,
        kind="openai",
        strategy=strategy,
        breaker=Breaker(name),
        pool=pool,
        **kw,  # type: ignore[arg-type]
    )


def failure(cls: FailureClass, retry_after: float | None = None, **kw: object) -> Failure:
    return Failure(cls, "x", 429, retry_after, **kw)  # type: ignore[arg-type]


def test_rate_limit_cools_until_the_providers_reset_and_no_longer() -> None:
    c = cred("a")
    c.lease(100.0, 10)
    c.failed(failure(FailureClass.RATE_LIMITED, 2.5), 100.0, RNG)
    assert c.current_health(101.0) is Health.COOLING
    assert c.free_at(101.0, 10) == pytest.approx(102.5)
    assert c.current_health(102.5) is Health.READY
    assert c.free_at(102.5, 10) == 102.5
    assert c.in_flight == 0


def test_rate_limit_without_hint_backs_off_exponentially_with_jitter() -> None:
    c = cred("a")
    waits = []
    now = 0.0
    for _ in range(4):
        c.lease(now, 1)
        c.failed(failure(FailureClass.RATE_LIMITED, None), now, RNG)
        waits.append(c.until - now)
        now = c.until
    for level, wait in enumerate(waits):
        assert 0.75 * 2**level <= wait <= 2**level
    c.lease(now, 1)
    c.succeeded(now, 5.0, None)
    assert c.backoff_level == 0


def test_quota_parks_for_the_ttl_and_auth_disables_until_a_rare_probe() -> None:
    quota = cred("q", quota_park_s=3600.0)
    quota.lease(0.0, 1)
    quota.failed(failure(FailureClass.QUOTA_EXHAUSTED), 0.0, RNG)
    assert quota.current_health(3599.0) is Health.PARKED
    assert quota.free_at(10.0, 1) == 3600.0

    bad = cred("bad", auth_probe_s=600.0)
    bad.lease(0.0, 1)
    bad.failed(failure(FailureClass.AUTH_FAILED), 0.0, RNG)
    assert bad.free_at(10.0, 1) == 600.0
    # After the probe interval one request may probe it; while that probe runs, no other.
    assert bad.free_at(600.0, 1) == 600.0
    bad.lease(600.0, 1)
    assert bad.free_at(600.1, 1) == math.inf
    bad.failed(failure(FailureClass.AUTH_FAILED), 601.0, RNG)
    assert bad.free_at(602.0, 1) == 1201.0


def test_target_failures_say_nothing_about_the_key() -> None:
    c = cred("a")
    for cls in (FailureClass.TARGET_DOWN, FailureClass.CONTEXT_OVERFLOW, FailureClass.BAD_REQUEST):
        c.lease(0.0, 1)
        c.failed(failure(cls), 0.0, RNG)
        assert c.current_health(0.0) is Health.READY
    assert c.in_flight == 0


def test_learned_window_is_spent_locally_until_the_reset() -> None:
    c = cred("a", proven=True)
    c.learn(RateLimitReport(requests=Window(limit=10, remaining=2, reset_s=4.0)), 100.0)
    c.lease(100.0, 1)
    assert c.free_at(100.0, 1) == 100.0
    c.lease(100.0, 1)
    # Both remaining requests are spent: the key waits for the provider's reset, no 429 needed.
    assert c.free_at(100.5, 1) == 104.0
    assert c.free_at(104.0, 1) == 104.0
    assert c.requests.left(104.0) == 10


def test_local_rpm_limit_is_a_sliding_minute() -> None:
    c = cred("a", rpm=LocalLimit(2))
    c.lease(0.0, 1)
    c.lease(1.0, 1)
    assert c.free_at(5.0, 1) == 60.0
    assert c.free_at(60.0, 1) == 60.0


def test_max_concurrent_waits_for_a_release() -> None:
    c = cred("a", max_concurrent=1)
    c.lease(0.0, 1)
    assert c.free_at(0.0, 1) == math.inf
    c.release()
    assert c.free_at(0.0, 1) == 0.0


def test_headroom_prefers_the_key_with_the_most_left() -> None:
    low, high, unknown = cred("low", 0), cred("high", 1), cred("unknown", 2)
    low.learn(RateLimitReport(requests=Window(100, 5, 30.0)), 0.0)
    high.learn(RateLimitReport(requests=Window(100, 60, 30.0)), 0.0)
    ordered = order_pool([low, high, unknown], "headroom", 1.0, RNG, 0)
    assert [c.label for c in ordered] == ["unknown", "high", "low"]


def test_rotation_strategies() -> None:
    pool = [cred("a", 0), cred("b", 1), cred("c", 2)]
    assert [c.label for c in order_pool(pool[::-1], "fill_first", 0, RNG, 0)] == ["a", "b", "c"]
    assert [c.label for c in order_pool(pool, "round_robin", 0, RNG, 4)] == ["b", "c", "a"]
    pool[0].in_flight = 2
    pool[1].uses = 5
    assert [c.label for c in order_pool(pool, "least_used", 0, RNG, 0)] == ["c", "b", "a"]
    seen = {
        tuple(c.label for c in order_pool(pool, "random", 0, random.Random(s), 0))
        for s in range(20)
    }
    assert len(seen) > 1


def test_plan_walks_the_chain_and_skips_an_open_breaker() -> None:
    a, b = cred("a", provider="p1"), cred("b", provider="p2")
    first, second = target("p1/m", [a]), target("p2/m", [b])
    for _ in range(3):
        first.breaker.failed(10.0, probe=False)
    assert first.breaker.position(10.0) is BreakerState.OPEN
    decision = plan([first, second], 10, 11.0)
    assert [(c.target.name, c.credential.label) for c in decision.candidates] == [("p2/m", "b")]
    b.lease(11.0, 10)
    b.failed(failure(FailureClass.RATE_LIMITED, 30.0), 11.0, RNG)
    decision = plan([first, second], 10, 12.0)
    assert decision.candidates == []
    assert decision.free_at == pytest.approx(15.0)  # the breaker's half-open time comes first
    assert decision.blocked is FailureClass.RATE_LIMITED


def test_plan_when_every_key_is_parked_names_quota_and_the_reset() -> None:
    keys = [cred("a", 0, quota_park_s=100.0), cred("b", 1, quota_park_s=50.0)]
    for k in keys:
        k.lease(0.0, 1)
        k.failed(failure(FailureClass.QUOTA_EXHAUSTED), 0.0, RNG)
    decision = plan([target("p/m", keys)], 1, 1.0)
    assert decision.candidates == []
    assert decision.blocked is FailureClass.QUOTA_EXHAUSTED
    assert decision.free_at == 50.0


def test_plan_skips_targets_the_request_cannot_fit() -> None:
    small = target("p/small", [cred("a")], context_window=1000)
    big = target("p/big", [cred("b")], context_window=100_000)
    decision = plan([small, big], 5000, 0.0)
    assert [c.target.name for c in decision.candidates] == ["p/big"]
    decision = plan([small], 5000, 0.0)
    assert decision.candidates == [] and decision.free_at is None
    assert decision.blocked is FailureClass.CONTEXT_OVERFLOW
    assert decision.largest_window == 1000


def test_plan_honours_exclusions() -> None:
    a, b = cred("a", 0), cred("b", 1)
    t = target("p/m", [a, b], strategy="fill_first")
    ex = Exclusions(credentials={("p", "a")})
    assert [c.credential.label for c in plan([t], 1, 0.0, exclusions=ex).candidates] == ["b"]
    ex = Exclusions(down={"p/m"})
    assert plan([t], 1, 0.0, exclusions=ex).candidates == []


def test_breaker_suspect_half_open_and_backoff() -> None:
    br = Breaker("t", failure_threshold=3, open_s=5.0, max_open_s=12.0)
    br.failed(0.0, probe=False)
    assert br.position(0.0) is BreakerState.SUSPECT
    probe = br.dispatched(0.0)
    assert probe and not br.admits(0.0)  # one probe at a time while suspect
    br.failed(1.0, probe)
    br.failed(1.0, probe=False)
    assert br.position(1.0) is BreakerState.OPEN and br.until == 6.0
    assert not br.admits(5.9)
    assert br.admits(6.0)
    probe = br.dispatched(6.0)
    assert not br.admits(6.0)
    br.failed(6.5, probe)
    assert br.until == 16.5  # open twice as long
    probe = br.dispatched(17.0)
    br.failed(17.0, probe)
    assert br.until == 29.0  # capped at max_open_s
    probe = br.dispatched(30.0)
    br.succeeded(4.0, probe)
    assert br.position(30.0) is BreakerState.CLOSED and br.admits(30.0)


def test_state_round_trip_keeps_cooldowns_across_clocks(tmp_path: Path) -> None:
    parked = cred("parked", quota_park_s=3600.0)
    parked.lease(50.0, 1)
    parked.failed(failure(FailureClass.QUOTA_EXHAUSTED), 50.0, RNG)
    breaker = Breaker("p/m")
    for _ in range(3):
        breaker.failed(50.0, probe=False)
    path = tmp_path / "state.msgpack"
    state_file.save(path, state_file.snapshot([parked], [breaker], {"p": 7}, 50.0, 1_000_000.0))
    assert b"sk-" not in path.read_bytes()

    # A new process: its monotonic clock starts elsewhere, 2 s of wall time later.
    fresh, changed_key = cred("parked"), CredentialState("p", "parked", "sha256:other", 0)
    new_breaker = Breaker("p/m")
    rotations: dict[str, int] = {}
    saved = state_file.load(path)
    assert saved is not None
    matched = state_file.restore(
        saved, [fresh, changed_key], [new_breaker], rotations, 5.0, 1_000_002.0
    )
    assert matched == 1
    assert fresh.current_health(5.0) is Health.PARKED
    assert fresh.until == pytest.approx(5.0 + 3600.0 - 2.0)
    assert changed_key.current_health(5.0) is Health.READY  # a replaced key starts fresh
    assert new_breaker.position(5.0) is BreakerState.OPEN
    assert new_breaker.position(8.0) is BreakerState.HALF_OPEN  # its 5 s ran out meanwhile
    assert rotations == {"p": 7}


def test_damaged_state_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "state.msgpack"
    path.write_bytes(b"\xc1garbage")
    with pytest.raises(ValueError, match="damaged"):
        state_file.load(path)


def test_a_reply_cannot_hand_back_capacity_the_provider_may_not_have_counted() -> None:
    c = cred("a", proven=True)
    first = c.lease(0.0, 1)
    c.succeeded(0.1, 5.0, RateLimitReport(requests=Window(10, 9, 2.0)), first)
    assert c.requests.left(0.1) == 9
    burst = [c.lease(0.2, 1) for _ in range(9)]
    assert c.free_at(0.2, 1) == pytest.approx(2.1)  # spent: wait for the reset
    # The provider handled the last one first and said "8 left" then; the other eight may
    # have come after it, so that reply proves nothing is left.
    c.succeeded(0.3, 5.0, RateLimitReport(requests=Window(10, 8, 2.0)), burst[-1])
    assert c.requests.left(0.3) == 0
    for lease in burst[:-1]:
        c.succeeded(0.4, 5.0, RateLimitReport(requests=Window(10, 1, 2.0)), lease)
    assert c.requests.left(0.4) == 0


def test_a_steady_flow_follows_the_providers_figure() -> None:
    c = cred("a", proven=True)
    c.succeeded(0.0, 1.0, RateLimitReport(requests=Window(500, 400, 12.0)), c.lease(0.0, 1))
    for n in range(1, 300):
        now = n * 0.1
        lease = c.lease(now, 1)
        # Two requests at a time in flight; the provider's figure holds steady near 400.
        c.succeeded(now + 0.05, 1.0, RateLimitReport(requests=Window(500, 400, 12.0)), lease)
    assert c.requests.left(30.0) == 400


def test_an_unproven_key_gets_one_request_until_it_answers() -> None:
    c = cred("new")
    c.lease(10.0, 1)
    # A burst waits for the first answer (or the probation) instead of landing on a bad key.
    assert c.free_at(10.1, 1) == 12.0
    c.succeeded(10.2, 200.0, None)
    c.lease(10.3, 1)
    assert c.free_at(10.3, 1) == 10.3


def test_an_unproven_target_gets_one_call_until_it_answers() -> None:
    br = Breaker("t")
    assert br.dispatched(0.0) is True
    assert not br.admits(0.5) and br.free_at(0.5) == 2.0
    assert br.admits(2.0)  # a slow first answer only holds the others back so long
    br.succeeded(10.0, True)
    assert br.dispatched(3.0) is False and br.admits(3.0)


def test_a_window_after_its_reset_counts_down_from_the_limit_once() -> None:
    c = cred("a", proven=True)
    c.learn(RateLimitReport(requests=Window(3, 0, 1.0)), 0.0)
    assert c.free_at(0.5, 1) == 1.0
    for _ in range(3):
        assert c.free_at(1.0, 1) == 1.0
        c.lease(1.0, 1)
    # The fresh window is spent too: the next request waits for the provider's report.
    assert c.free_at(1.0, 1) > 1.0


def test_a_zero_retry_after_still_cools_the_key_briefly() -> None:
    c = cred("a", proven=True)
    c.lease(5.0, 1)
    c.failed(failure(FailureClass.RATE_LIMITED, 0.0), 5.0, RNG)
    # Never a tight loop on a key that keeps answering 429 with "retry-after: 0".
    assert c.free_at(5.0, 1) == pytest.approx(5.1)


# ---- the pool index: a large pool's first pick, checked against the full plan -----------


def _random_key(i: int, rng: random.Random, now: float) -> CredentialState:
    c = cred(f"k{i}", i, max_concurrent=rng.choice([None, None, 1, 2]))
    c.proven = rng.random() < 0.9
    c.uses, c.last_used = rng.randrange(50), now - rng.uniform(0, 30)
    c.in_flight = rng.choice([0, 0, 0, 1])
    if rng.random() < 0.7:
        c.requests.limit, c.requests.remaining = 100, rng.randrange(0, 100)
        c.requests.reset_at, c.requests.guessed = now + rng.uniform(-5, 20), False
    if rng.random() < 0.3:
        c.tokens.limit, c.tokens.remaining = 10_000, rng.randrange(0, 10_000)
        c.tokens.reset_at, c.tokens.guessed = now + rng.uniform(-5, 20), False
    roll = rng.random()
    if roll < 0.4:
        c.health, c.until = Health.COOLING, now + rng.uniform(-2, 20)
    elif roll < 0.45:
        c.health, c.until = Health.PARKED, now + rng.uniform(-2, 20)
    elif roll < 0.5:
        c.health, c.until = Health.DISABLED, now + rng.uniform(-2, 20)
    if rng.random() < 0.1:
        c.long_lane_until = now + rng.uniform(-2, 10)
    return c


def _churn(pool: list[CredentialState], rng: random.Random, now: float, n: int) -> None:
    """What the routing core does to keys between picks: leases, failures, successes."""
    for c in rng.sample(pool, n):
        roll = rng.random()
        if roll < 0.4:
            c.lease(now, rng.randrange(1, 3000))
        elif roll < 0.7:
            c.failed(failure(FailureClass.RATE_LIMITED, rng.uniform(0.5, 10)), now, RNG)
        elif roll < 0.8:
            c.failed(failure(FailureClass.LONG_CONTEXT_LIMITED, 5.0), now, RNG)
        else:
            limits = RateLimitReport(requests=Window(100, rng.randrange(100), 5.0))
            c.succeeded(now, 100.0, limits, c.lease(now, 10))


@pytest.mark.parametrize("strategy", ["headroom", "fill_first", "round_robin", "least_used"])
def test_a_large_pool_picks_the_key_the_full_plan_puts_first(strategy: str) -> None:
    rng, now = random.Random(strategy), 1000.0
    pool = [_random_key(i, rng, now) for i in range(10_000)]
    t = target("p/m", pool, strategy, context_window=8_000, long_context_window=100_000)
    rotations = {"p": 0}
    for step in range(12):
        for tokens in (100, 5_000, 50_000):
            ruled = Exclusions(
                credentials={("p", f"k{rng.randrange(10_000)}")} if step % 3 else set()
            )
            kw = {"exclusions": ruled, "rotations": rotations}
            quick = plan([t], tokens, now, first_only=True, **kw)  # type: ignore[arg-type]
            full = plan([t], tokens, now, **kw)  # type: ignore[arg-type]
            assert [(c.credential.label, c.long) for c in quick.candidates] == [
                (c.credential.label, c.long) for c in full.candidates[:1]
            ], (step, tokens)
        rotations["p"] += rng.randrange(1, 50)
        now += rng.uniform(0, 4)
        _churn(pool, rng, now, 200)


@pytest.mark.parametrize("strategy", ["headroom", "fill_first", "round_robin", "least_used"])
def test_a_small_pool_picks_the_key_the_full_plan_puts_first(strategy: str) -> None:
    # first_only orders a small pool and tries its keys in turn; the pick is the full plan's.
    rng, now = random.Random(strategy + "small"), 1000.0
    pool = [_random_key(i, rng, now) for i in range(12)]
    backup = [_random_key(100 + i, rng, now) for i in range(3)]
    chain = [
        target("p/m", pool, strategy, context_window=8_000, long_context_window=100_000),
        target("q/m", backup, strategy),
    ]
    rotations = {"p": 0, "q": 0}
    for step in range(200):
        for tokens in (100, 5_000, 50_000):
            ruled = Exclusions(credentials={("p", f"k{rng.randrange(12)}")} if step % 3 else set())
            kw = {"exclusions": ruled, "rotations": rotations}
            quick = plan(chain, tokens, now, first_only=True, **kw)  # type: ignore[arg-type]
            full = plan(chain, tokens, now, **kw)  # type: ignore[arg-type]
            assert [(c.credential.label, c.long) for c in quick.candidates] == [
                (c.credential.label, c.long) for c in full.candidates[:1]
            ], (step, tokens)
            if not quick.candidates:  # none: the full plan, to say why and until when
                assert (quick.partial, quick.free_at, quick.blocked) == (
                    False,
                    full.free_at,
                    full.blocked,
                )
        rotations["p"] += rng.randrange(1, 5)
        now += rng.uniform(0, 4)
        _churn(pool, rng, now, 3)
        _churn(backup, rng, now, 1)


def test_a_small_random_pool_picks_what_the_full_plan_would_from_the_same_draw() -> None:
    rng, now = random.Random(11), 1000.0
    pool = [_random_key(i, rng, now) for i in range(12)]
    t = target("p/m", pool, "random")
    picked: set[str] = set()
    for seed in range(60):
        quick = plan([t], 100, now, first_only=True, rng=random.Random(seed))
        full = plan([t], 100, now, rng=random.Random(seed))
        assert [c.credential.label for c in quick.candidates] == [
            c.credential.label for c in full.candidates[:1]
        ]
        picked.update(c.credential.label for c in quick.candidates)
        _churn(pool, rng, now, 2)
        now += 0.5
    assert len(picked) > 4


def test_a_large_random_pool_picks_a_usable_key_and_spreads() -> None:
    rng, now = random.Random(5), 1000.0
    pool = [_random_key(i, rng, now) for i in range(10_000)]
    t = target("p/m", pool, "random")
    picked = set()
    for _ in range(50):
        decision = plan([t], 100, now, first_only=True, rng=rng)
        (candidate,) = decision.candidates
        assert candidate.credential.free_at(now, 100) <= now
        picked.add(candidate.credential.label)
        _churn(pool, rng, now, 20)
        now += 0.5
    assert len(picked) > 40


def test_a_large_pool_never_picks_a_key_changed_behind_the_routing_core() -> None:
    # A restored state or a reload writes keys directly, without telling the index: the
    # pick is still checked against the key itself, and a pool changed in place rebuilds.
    now = 1000.0
    pool = [cred(f"k{i}", i) for i in range(100)]
    t = target("p/m", pool, "fill_first")
    assert plan([t], 10, now, first_only=True).candidates[0].credential.label == "k0"
    pool[0].health, pool[0].until = Health.COOLING, now + 30
    assert plan([t], 10, now, first_only=True).candidates[0].credential.label == "k1"
    pool[:] = [cred(f"n{i}", i) for i in range(100)]
    assert plan([t], 10, now, first_only=True).candidates[0].credential.label == "n0"
    pool[:] = pool[:50]
    for c in pool:
        c.health, c.until = Health.PARKED, now + 30
    quick = plan([t], 10, now, first_only=True)
    assert not quick.candidates and quick.blocked is FailureClass.QUOTA_EXHAUSTED
    assert quick.free_at == pytest.approx(now + 30)


def test_a_key_without_long_context_is_never_tried_for_a_long_request() -> None:
    # long_context = false on the credential: no probe, no 429 to learn it from.
    short_only = cred("short", 0, proven=True, long_context=False)
    both = cred("both", 1, proven=True)
    t = target(
        "p/m", [short_only, both], "fill_first", context_window=8_000, long_context_window=100_000
    )
    long_plan = plan([t], 50_000, 100.0)
    assert [(c.credential.label, c.long) for c in long_plan.candidates] == [("both", True)]
    short_plan = plan([t], 1_000, 100.0)
    assert [c.credential.label for c in short_plan.candidates] == ["short", "both"]
    # The only key left for long requests gone: the client hears of the long lane, not of a
    # window that will never open on the short-only key.
    both.long_lane_until = 130.0
    blocked = plan([t], 50_000, 100.0)
    assert blocked.candidates == [] and blocked.long_lane_back_at == 130.0


def test_a_pool_with_no_long_context_key_holds_no_long_request() -> None:
    t = target(
        "p/m",
        [cred("a", 0, proven=True, long_context=False)],
        "fill_first",
        context_window=8_000,
        long_context_window=100_000,
    )
    decision = plan([t], 50_000, 100.0)
    assert decision.candidates == [] and decision.free_at is None
    assert decision.blocked is FailureClass.CONTEXT_OVERFLOW

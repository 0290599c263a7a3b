"""The dispatcher in-process, with scripted upstream adapters: long-context lanes and fit,
and the bounds on ad-hoc targets (an injected clock drives their expiry)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import structlog.testing

from routerd.config.secrets import Secret
from routerd.core.breaker import Breaker
from routerd.core.calls import Call, Completion
from routerd.core.credential import CredentialState, Health
from routerd.core.errors import Refused
from routerd.core.outcome import Failure, FailureClass, RateLimitReport, UpstreamFailure
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.attempt import ProviderRuntime
from routerd.dispatch.dispatcher import Dispatcher
from routerd.dispatch.routes import Route
from routerd.upstream.base import Stream

LONG_BETA = {"anthropic-beta": "context-1m-2025-08-07"}


class ScriptedAdapter:
    """Answers each call with what ``decide(call, credential label)`` says."""

    kind = "scripted"

    def __init__(self, decide: Callable[[Call, str], Failure | None], keys: dict[str, str]):
        self.decide = decide
        self.keys = keys
        self.calls: list[tuple[str, str, bool]] = []

    async def complete(self, call: Call) -> Completion:
        label = self.keys[call.key]
        long = "anthropic-beta" in call.headers
        self.calls.append((call.model, label, long))
        failure = self.decide(call, label)
        if failure is not None:
            raise UpstreamFailure(failure)
        prompt = sum(len(m["content"]) for m in call.body["messages"]) // 2
        return Completion(
            text=f"ok from {label}",
            model=call.model,
            finish_reason="stop",
            usage={"prompt_tokens": prompt, "completion_tokens": 1},
            limits=RateLimitReport(),
        )

    def stream(self, call: Call) -> AbstractAsyncContextManager[Stream]:
        @asynccontextmanager
        async def never() -> AsyncIterator[Stream]:
            raise AssertionError("not streamed in these tests")
            yield  # pragma: no cover

        return never()


@asynccontextmanager
async def running(
    decide: Callable[[Call, str], Failure | None], *, backup_window: int | None = None
) -> AsyncIterator[tuple[Dispatcher, ScriptedAdapter]]:
    """A dispatcher whose credential actors run, as in the daemon."""
    dispatcher, adapter = build(decide, backup_window=backup_window)
    async with anyio.create_task_group() as tg:
        for actor in dispatcher.actors.values():
            await tg.start(actor.run)
        yield dispatcher, adapter
        tg.cancel_scope.cancel()


def build(
    decide: Callable[[Call, str], Failure | None], *, backup_window: int | None = None
) -> tuple[Dispatcher, ScriptedAdapter]:
    keys = {"sk-a-000000000000": "a", "sk-b-000000000000": "b"}
    states = {}
    actors = {}
    for order, (key, label) in enumerate(keys.items()):
        state = CredentialState("anthropic", label, f"sha256:{label}", order, proven=True)
        states[label] = state
        actors[("anthropic", label)] = CredentialActor(
            state,
            Secret("anthropic", label, key, f"sha256:{label}"),
            mailbox_size=8,
            on_change=lambda: None,
        )
    claude = Target(
        name="anthropic/claude",
        provider="anthropic",
        model="claude",
        kind="anthropic",
        strategy="fill_first",
        breaker=Breaker("anthropic/claude", proven=True),
        pool=[states["a"], states["b"]],
        context_window=200_000,
        long_context_window=1_000_000,
        long_context_headers=LONG_BETA,
    )
    chain = [claude]
    adapter = ScriptedAdapter(decide, keys)
    providers = {"anthropic": ProviderRuntime("anthropic", adapter, "http://x", 30.0, {})}
    if backup_window is not None:
        backup_state = CredentialState("backup", "c", "sha256:c", 2, proven=True)
        keys["sk-c-000000000000"] = "c"
        actors[("backup", "c")] = CredentialActor(
            backup_state,
            Secret("backup", "c", "sk-c-000000000000", "sha256:c"),
            mailbox_size=8,
            on_change=lambda: None,
        )
        chain.append(
            Target(
                name="backup/big",
                provider="backup",
                model="big",
                kind="openai",
                strategy="fill_first",
                breaker=Breaker("backup/big", proven=True),
                pool=[backup_state],
                context_window=backup_window,
            )
        )
        providers["backup"] = ProviderRuntime("backup", adapter, "http://y", 30.0, {})
    routes = {"r": Route("r", chain, 5.0, 1)}
    targets = {t.name: t for t in chain}
    return Dispatcher(routes, targets, actors, providers, rng=random.Random(1)), adapter


def long_context_limited() -> Failure:
    return Failure(
        FailureClass.LONG_CONTEXT_LIMITED,
        "Extra usage is required for long context requests.",
        429,
        retry_after=30.0,
    )


def request(chars: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "x" * chars}], "max_tokens": 100}


LONG = 1_200_000  # ~300k tokens: past the 200k window, inside the 1M one
SHORT = 4_000


async def test_long_context_429_closes_only_that_lane() -> None:
    def decide(call: Call, label: str) -> Failure | None:
        if label == "a" and "anthropic-beta" in call.headers:
            return long_context_limited()
        return None

    async with running(decide) as (dispatcher, adapter):
        reply = await dispatcher.chat("r", request(LONG))
        assert reply.credential == "b"
        assert [a.outcome for a in reply.attempts] == ["long_context_limited", "ok"]
        assert adapter.calls == [("claude", "a", True), ("claude", "b", True)]
        a = dispatcher.actors[("anthropic", "a")].state
        assert a.current_health(0.0) is Health.READY  # the short lane is untouched
        # Short requests keep using "a" at full rate; long ones skip it without a call.
        adapter.calls.clear()
        for _ in range(5):
            assert (await dispatcher.chat("r", request(SHORT))).credential == "a"
        assert (await dispatcher.chat("r", request(LONG))).credential == "b"
        assert adapter.calls == [("claude", "a", False)] * 5 + [("claude", "b", True)]


def always_long_limited(call: Call, label: str) -> Failure | None:
    return long_context_limited() if "anthropic-beta" in call.headers else None


async def test_when_no_lane_holds_a_long_request_the_client_gets_a_downgrade() -> None:
    async with running(always_long_limited) as (dispatcher, _):
        with pytest.raises(Refused) as caught:
            await dispatcher.chat("r", request(LONG))
        error = caught.value
        assert error.kind == "context_tier_downgrade" and error.details is not None
        assert error.details["largest_window"] == 200_000
        assert 29.0 < error.details["long_lane_back_in"] <= 30.0
        assert len(error.attempts) == 2
        # Short requests still succeed; a long-context 429 never shrank the short window.
        assert (await dispatcher.chat("r", request(SHORT))).credential == "a"


async def test_a_long_request_moves_to_a_target_whose_window_holds_it() -> None:
    async with running(always_long_limited, backup_window=1_000_000) as (dispatcher, adapter):
        reply = await dispatcher.chat("r", request(LONG))
        assert reply.target == "backup/big"
        assert adapter.calls[-1] == ("big", "c", False)


async def test_a_request_no_window_fits_fails_with_the_sizes_and_no_call() -> None:
    async with running(lambda call, label: None) as (dispatcher, adapter):
        with pytest.raises(Refused) as caught:
            await dispatcher.chat("r", request(5_000_000))
        assert caught.value.kind == "context_overflow"
        assert "1000000" in caught.value.message and "tokens" in caught.value.message
        assert adapter.calls == []


async def test_the_dispatcher_plans_with_the_estimate_a_front_made_already() -> None:
    async with running(lambda call, label: None) as (dispatcher, adapter):
        with pytest.raises(Refused) as caught:
            await dispatcher.chat("r", request(SHORT), prompt_tokens=5_000_000)
        assert caught.value.kind == "context_overflow" and adapter.calls == []
        assert (await dispatcher.chat("r", request(SHORT), prompt_tokens=10)).credential == "a"


async def test_reported_usage_corrects_the_token_estimate() -> None:
    async with running(lambda call, label: None) as (dispatcher, _):
        target = dispatcher.targets["anthropic/claude"]
        for _ in range(10):
            await dispatcher.chat("r", request(SHORT))
        # The scripted provider counts two characters a token, the estimate four.
        assert target.token_scale > 1.5


async def test_a_prompt_the_provider_counts_past_the_window_retries_on_the_long_lane() -> None:
    def decide(call: Call, label: str) -> Failure | None:
        if "anthropic-beta" not in call.headers:
            return Failure(
                FailureClass.CONTEXT_OVERFLOW, "prompt is too long: 208310 tokens > 200000", 400
            )
        return None

    async with running(decide) as (dispatcher, adapter):
        # Estimated at ~190k tokens (inside the normal window); the provider counts more.
        reply = await dispatcher.chat("r", request(760_000))
        assert [a.outcome for a in reply.attempts] == ["context_overflow", "ok"]
        assert adapter.calls == [("claude", "a", False), ("claude", "a", True)]


async def test_a_key_that_always_answers_429_with_no_wait_is_not_hammered() -> None:
    def decide(call: Call, label: str) -> Failure | None:
        return Failure(FailureClass.RATE_LIMITED, "slow down", 429, retry_after=0.0)

    async with running(decide) as (dispatcher, adapter):
        with pytest.raises(Refused) as caught:
            await dispatcher.chat("r", request(SHORT), deadline=1.0)
        assert caught.value.kind == "rate_limited"
        # Two keys cooled at least 0.1 s per 429 within a 1 s deadline: about 20 calls, not
        # thousands, and never more than one request's attempt cap.
        assert 2 <= len(adapter.calls) <= 32


# ---- ad-hoc targets: requests that name provider/model instead of a route ----------------


class HeldAdapter(ScriptedAdapter):
    """A scripted adapter whose calls to ad-hoc models wait while ``gate`` is unset.

    Calls to the configured route's model ("claude") are never held.
    """

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__(lambda call, label: None, keys)
        self.gate: anyio.Event | None = None
        self.entered = 0

    async def complete(self, call: Call) -> Completion:
        self.entered += 1
        if self.gate is not None and call.model != "claude":
            await self.gate.wait()
        return await super().complete(call)

    async def until_entered(self, count: int) -> None:
        """Wait until ``count`` calls reached the upstream."""
        with anyio.fail_after(5):
            while self.entered < count:  # noqa: ASYNC110 - a call has no event to wait on
                await anyio.sleep(0.001)


class Clock:
    """An injected monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Adhoc:
    """A dispatcher that builds targets on demand, its upstream, clock, and dropped names."""

    dispatcher: Dispatcher
    adapter: HeldAdapter
    clock: Clock
    dropped: list[str]


@asynccontextmanager
async def adhoc(limit: int, idle_s: float) -> AsyncIterator[Adhoc]:
    """The test dispatcher with route "r", building any "anthropic/<model>" on demand."""
    base, _ = build(lambda call, label: None)
    adapter = HeldAdapter({a.secret.key: a.secret.label for a in base.actors.values()})
    pool = [a.state for a in base.actors.values()]

    def make_target(name: str) -> Target | None:
        provider, _, model = name.partition("/")
        if provider != "anthropic" or not model:
            return None
        return Target(name, provider, model, "anthropic", "fill_first", Breaker(name), pool)

    clock = Clock()
    dropped: list[str] = []
    dispatcher = Dispatcher(
        base.routes,
        base.targets,
        base.actors,
        {"anthropic": ProviderRuntime("anthropic", adapter, "http://x", 30.0, {})},
        clock=clock,
        make_target=make_target,
        max_adhoc_targets=limit,
        adhoc_idle_s=idle_s,
        on_drop=dropped.append,
    )
    async with anyio.create_task_group() as tg:
        for actor in dispatcher.actors.values():
            await tg.start(actor.run)
        yield Adhoc(dispatcher, adapter, clock, dropped)
        tg.cancel_scope.cancel()


async def test_an_idle_adhoc_target_expires_and_a_configured_one_never_does() -> None:
    async with adhoc(limit=8, idle_s=600) as a:
        configured = set(a.dispatcher.targets)
        await a.dispatcher.chat("anthropic/m1", request(SHORT))
        await a.dispatcher.chat("r", request(SHORT))
        assert "anthropic/m1" in a.dispatcher.targets and "anthropic/m1" in a.dispatcher.routes
        a.clock.now += 599
        a.dispatcher.sweep()
        assert "anthropic/m1" in a.dispatcher.targets
        a.clock.now += 2
        a.dispatcher.sweep()
        assert "anthropic/m1" not in a.dispatcher.targets
        assert "anthropic/m1" not in a.dispatcher.routes
        assert a.dropped == ["anthropic/m1"]
        assert set(a.dispatcher.targets) == configured and "r" in a.dispatcher.routes
        # Named again, it is built afresh and served.
        assert (await a.dispatcher.chat("anthropic/m1", request(SHORT))).target == "anthropic/m1"


async def test_an_adhoc_target_with_a_request_in_flight_is_kept() -> None:
    async with adhoc(limit=8, idle_s=10) as a:
        a.adapter.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.dispatcher.chat, "anthropic/slow", request(SHORT))
            await a.adapter.until_entered(1)
            a.clock.now += 60
            a.dispatcher.sweep()
            assert "anthropic/slow" in a.dispatcher.targets
            a.adapter.gate.set()
        # Idle time counts from the request's end, not its start.
        a.clock.now += 9
        a.dispatcher.sweep()
        assert "anthropic/slow" in a.dispatcher.targets
        a.clock.now += 2
        a.dispatcher.sweep()
        assert a.dropped == ["anthropic/slow"]


async def test_past_the_cap_the_least_recently_used_idle_target_makes_room() -> None:
    async with adhoc(limit=2, idle_s=600) as a:
        for name in ("anthropic/a", "anthropic/b", "anthropic/a"):
            await a.dispatcher.chat(name, request(SHORT))
            a.clock.now += 1
        await a.dispatcher.chat("anthropic/c", request(SHORT))
        assert a.dropped == ["anthropic/b"]  # "a" was used after "b"
        adhoc_names = {n for n in a.dispatcher.targets if n.startswith("anthropic/")} - {
            "anthropic/claude"
        }
        assert adhoc_names == {"anthropic/a", "anthropic/c"}


async def test_past_the_cap_with_every_adhoc_target_busy_a_new_name_gets_a_clear_error() -> None:
    async with adhoc(limit=2, idle_s=600) as a:
        a.adapter.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.dispatcher.chat, "anthropic/a", request(SHORT))
            tg.start_soon(a.dispatcher.chat, "anthropic/b", request(SHORT))
            await a.adapter.until_entered(2)
            with pytest.raises(Refused) as caught:
                await a.dispatcher.chat("anthropic/c", request(SHORT))
            assert caught.value.kind == "unavailable"
            assert "server.max_adhoc_targets = 2" in caught.value.message
            assert caught.value.retry_after == 1.0
            assert "anthropic/c" not in a.dispatcher.targets
            # The configured route is untouched by the cap.
            assert (await a.dispatcher.chat("r", request(SHORT))).target == "anthropic/claude"
            a.adapter.gate.set()
        assert a.dropped == []
        # Once one is idle, the new name evicts it and is served.
        assert (await a.dispatcher.chat("anthropic/c", request(SHORT))).target == "anthropic/c"
        assert a.dropped == ["anthropic/a"]


async def test_a_name_with_no_provider_is_an_unknown_route_and_takes_no_place() -> None:
    async with adhoc(limit=1, idle_s=600) as a:
        for name in ("nope/m1", "nope/m2", "just-a-name"):
            with pytest.raises(Refused) as caught:
                await a.dispatcher.chat(name, request(SHORT))
            assert caught.value.kind == "unknown_route"
        assert (await a.dispatcher.chat("anthropic/ok", request(SHORT))).target == "anthropic/ok"
        assert a.dropped == []


async def test_a_failed_request_and_its_breaker_are_logged_at_warning() -> None:
    def down(call: Call, label: str) -> Failure:
        return Failure(FailureClass.TARGET_DOWN, "upstream 503", 503)

    async with running(down) as (dispatcher, _):
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(Refused):
                    await dispatcher.chat("r", request(SHORT))
    requests = [e for e in logs if e["event"] == "request"]
    assert requests and all(e["log_level"] == "warning" for e in requests)
    breakers = [e for e in logs if str(e["event"]).startswith("breaker_")]
    assert breakers and all(e["log_level"] == "warning" for e in breakers)

    async with running(lambda call, label: None) as (dispatcher, _):
        with structlog.testing.capture_logs() as logs:
            await dispatcher.chat("r", request(SHORT))
            # A reply's line follows the reply, on the loop's next turn.
            assert [e for e in logs if e["event"] == "request"] == []
            await anyio.lowlevel.checkpoint()
    assert [e["log_level"] for e in logs if e["event"] == "request"] == ["info"]


async def test_a_request_takes_its_pools_first_key_and_a_conversation_chooses_among_all() -> None:
    # A request with no conversation plans its first candidate only (fill_first: "a"); a new
    # conversation is placed where the fewest are held, so it still sees every key.
    async with running(lambda call, label: None) as (dispatcher, _):
        plain = [(await dispatcher.chat("r", request(SHORT))).credential for _ in range(4)]
        assert plain == ["a"] * 4
        placed = [
            (await dispatcher.chat("r", request(SHORT), session=f"conversation-{n}")).credential
            for n in range(4)
        ]
        assert placed == ["a", "b", "a", "b"]
        await dispatcher.wait_idle()


async def test_a_reply_returns_before_its_bookkeeping_which_every_plan_and_status_sees() -> None:
    async with running(lambda call, label: None) as (dispatcher, _):
        key = dispatcher.targets["anthropic/claude"].pool[0]
        await dispatcher.chat("r", request(SHORT))
        # The reply came back with its attempt still to settle: the answer leaves first.
        assert (key.in_flight, key.successes) == (1, 0)
        dispatcher.sweep()  # what status and /metrics do first
        assert (key.in_flight, key.successes) == (0, 1)
        # With no turn of the loop between them, each plan settles the reply before it.
        for _ in range(3):
            assert (await dispatcher.chat("r", request(SHORT))).credential == "a"
        assert (key.in_flight, key.successes) == (1, 3)
        await anyio.lowlevel.checkpoint()
        assert (key.in_flight, key.successes) == (0, 4)
        await dispatcher.wait_idle()


async def test_a_failed_attempt_is_settled_before_the_request_goes_on() -> None:
    def first_fails(call: Call, label: str) -> Failure | None:
        if label == "a":
            return Failure(FailureClass.RATE_LIMITED, "429", 429, retry_after=30.0)
        return None

    async with running(first_fails) as (dispatcher, _):
        a, b = dispatcher.targets["anthropic/claude"].pool
        reply = await dispatcher.chat("r", request(SHORT))
        assert reply.credential == "b"
        # The 429 cooled "a" at once; only the reply from "b" is still owed.
        assert (a.in_flight, a.health.value) == (0, "cooling")
        assert b.in_flight == 1
        await anyio.lowlevel.checkpoint()
        assert b.in_flight == 0

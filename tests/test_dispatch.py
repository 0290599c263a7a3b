"""The dispatcher in-process, with scripted upstream adapters: long-context lanes and fit."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest
from routerd_client import ContextOverflow, ContextTierDowngrade, RateLimited

from routerd.actor import CredentialActor
from routerd.breaker import Breaker
from routerd.credential import CredentialState, Health
from routerd.dispatch import Dispatcher, ProviderRuntime, Route
from routerd.outcome import Failure, FailureClass, RateLimitReport, UpstreamFailure
from routerd.plan import Target
from routerd.secrets import Secret
from routerd.upstream.base import Call, Completion, Stream

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
        with pytest.raises(ContextTierDowngrade) as caught:
            await dispatcher.chat("r", request(LONG))
        error = caught.value
        assert error.largest_window == 200_000
        assert error.long_lane_back_in is not None and 29.0 < error.long_lane_back_in <= 30.0
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
        with pytest.raises(ContextOverflow) as caught:
            await dispatcher.chat("r", request(5_000_000))
        assert "1000000" in caught.value.message and "tokens" in caught.value.message
        assert adapter.calls == []


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
        with pytest.raises(RateLimited):
            await dispatcher.chat("r", request(SHORT), deadline=1.0)
        # Two keys cooled at least 0.1 s per 429 within a 1 s deadline: about 20 calls, not
        # thousands, and never more than one request's attempt cap.
        assert 2 <= len(adapter.calls) <= 32

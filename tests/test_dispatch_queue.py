"""The dispatcher's wait queue, in-process: who is served next when capacity is short.

One key that takes one request at a time (max_concurrent = 1) in front of a paced fake
upstream that records the order requests reached it. What a user notices: higher
priority goes first; a client's own requests keep their order; a client with 500 queued
requests does not starve one with 5; a queued request keeps its deadline, and one that
cannot be served in time is told at once; a client that hangs up leaves the queue
without stalling the others; capacity that frees up on a timer is used when it frees.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest

from routerd.config.secrets import Secret
from routerd.core.breaker import Breaker
from routerd.core.calls import Call, Completion
from routerd.core.credential import CredentialState, Health
from routerd.core.errors import Refused
from routerd.core.outcome import RateLimitReport
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.attempt import ProviderRuntime
from routerd.dispatch.dispatcher import Dispatcher
from routerd.dispatch.routes import Route
from routerd.upstream.base import Stream

KEY = "sk-paced-000000000000"


class PacedAdapter:
    """Answers each call after ``latency_s``, or when the gate held for its text opens.

    ``order`` lists the text of each request in the order it reached the upstream.
    """

    kind = "paced"

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.order: list[str] = []
        self.held: dict[str, anyio.Event] = {}

    async def complete(self, call: Call) -> Completion:
        text = call.body["messages"][-1]["content"]
        self.order.append(text)
        gate = self.held.get(text)
        if gate is not None:
            await gate.wait()
        else:
            await anyio.sleep(self.latency_s)
        return Completion(
            text=f"ok {text}",
            model=call.model,
            finish_reason="stop",
            usage={"prompt_tokens": 1, "completion_tokens": 1},
            limits=RateLimitReport(),
        )

    def stream(self, call: Call) -> AbstractAsyncContextManager[Stream]:
        raise AssertionError("not streamed in these tests")


class Pool:
    """A running dispatcher over one max_concurrent = 1 key, and its paced upstream."""

    def __init__(self, dispatcher: Dispatcher, adapter: PacedAdapter, key: CredentialState):
        self.dispatcher = dispatcher
        self.adapter = adapter
        self.key = key
        self.route = dispatcher.routes["r"]
        self.on_change: Callable[[], None] = lambda: None

    async def chat(self, text: str, **kwargs: Any) -> str:
        reply = await self.dispatcher.chat(
            "r", {"messages": [{"role": "user", "content": text}], "max_tokens": 8}, **kwargs
        )
        return reply.text

    def hold(self, text: str) -> anyio.Event:
        """Make the request ``text`` keep the key busy until the returned gate is set."""
        gate = anyio.Event()
        self.adapter.held[text] = gate
        return gate

    async def until_sent(self, text: str) -> None:
        """Wait until the request ``text`` reached the upstream."""
        await until(lambda: text in self.adapter.order)

    async def until_queued(self, count: int) -> None:
        """Wait until ``count`` requests wait in the route's queue."""
        await until(lambda: len(self.route.queue) >= count)


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the dispatcher's state has no event a test could wait on)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.001)


@asynccontextmanager
async def pool(*, latency_s: float = 0.0, deadline_s: float = 30.0) -> AsyncIterator[Pool]:
    """A dispatcher whose key serves one request at a time; changes wake the queue.

    The key's actor runs as in the daemon, but its own timers wake nobody: a cooldown that
    runs out is found by the route's timer alone.
    """
    key = CredentialState("paced", "k", "sha256:k", 0, max_concurrent=1, proven=True)
    actor = CredentialActor(
        key, Secret("paced", "k", KEY, "sha256:k"), mailbox_size=8, on_change=lambda: None
    )
    target = Target(
        name="paced/m",
        provider="paced",
        model="m",
        kind="openai",
        strategy="fill_first",
        breaker=Breaker("paced/m", proven=True),
        pool=[key],
    )
    adapter = PacedAdapter(latency_s)
    dispatcher = Dispatcher(
        {"r": Route("r", [target], deadline_s, 1)},
        {target.name: target},
        {("paced", "k"): actor},
        {"paced": ProviderRuntime("paced", adapter, "http://paced", 30.0, {})},
        rng=random.Random(1),
        on_change=lambda: running.on_change(),
    )
    running = Pool(dispatcher, adapter, key)
    running.on_change = dispatcher.notify
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        yield running
        tg.cancel_scope.cancel()


async def test_a_request_beyond_max_concurrent_waits_for_the_release() -> None:
    async with pool(latency_s=0.2) as p:
        results: list[str] = []

        async def send(text: str) -> None:
            results.append(await p.chat(text))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "first")
            tg.start_soon(send, "second")
        # Before, the second failed at once: "every credential is cooling past the deadline".
        assert sorted(results) == ["ok first", "ok second"]


async def test_higher_priority_waiters_go_first() -> None:
    async with pool() as p:
        gate = p.hold("busy")
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.chat, "busy")
            await p.until_sent("busy")
            queued = [("low-a1", 0, "a"), ("high-b", 5, "b"), ("low-a2", 0, "a")]
            queued += [("high-c", 5, "c"), ("mid-d", 1, "d")]
            for n, (text, priority, client) in enumerate(queued, 1):
                tg.start_soon(
                    lambda t, r, c: p.chat(t, priority=r, client=c), text, priority, client
                )
                await p.until_queued(n)
            gate.set()
        assert p.adapter.order == ["busy", "high-b", "high-c", "mid-d", "low-a1", "low-a2"]


async def test_clients_take_turns_and_each_keeps_its_own_order() -> None:
    async with pool() as p:
        gate = p.hold("busy")
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.chat, "busy")
            await p.until_sent("busy")
            n = 0
            for client in ("a", "b"):
                for i in range(4):
                    tg.start_soon(lambda t, c: p.chat(t, client=c), f"{client}{i}", client)
                    n += 1
                    await p.until_queued(n)
            gate.set()
        # "a" queued all four before "b" sent any; still they alternate, each in order.
        assert p.adapter.order == ["busy", "a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]


async def test_a_client_with_500_queued_does_not_starve_one_with_5() -> None:
    async with pool(latency_s=0.001) as p:
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(lambda t: p.chat(t, client="pid:1"), f"A{i}")
            await p.until_queued(400)
            for i in range(5):
                tg.start_soon(lambda t: p.chat(t, client="pid:2"), f"B{i}")
        order = p.adapter.order
        assert len(order) == 505
        b_at = [order.index(f"B{i}") for i in range(5)]
        a_before = [sum(1 for t in order[:at] if t.startswith("A")) for at in b_at]
        # B arrived when A had 400+ waiting; each of B's went within a few of A's turns,
        # so all five were done before A's 10% (50th) request was even sent.
        assert max(b_at) < 50, (b_at, a_before)
        assert b_at == sorted(b_at)


async def test_1000_waiters_drain_without_a_wakeup_storm() -> None:
    async with pool() as p:
        gate = p.hold("busy")
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.chat, "busy")
            await p.until_sent("busy")
            for i in range(1000):
                tg.start_soon(lambda t: p.chat(t, client=f"pid:{int(t[1:]) % 7}"), f"w{i}")
            await p.until_queued(1000)
            started = time.monotonic()
            gate.set()
        drained = time.monotonic() - started
        assert len(p.adapter.order) == 1001
        # One waiter woken per freed slot: 0.2 s here. Waking every waiter on each change
        # took half a million wake-ups and re-plans: 12 s of CPU on the same machine.
        assert drained < 3.0, f"1000 queued requests took {drained:.1f} s to drain"


async def test_a_queued_request_keeps_its_deadline_and_leaves_the_queue() -> None:
    async with pool() as p:
        gate = p.hold("busy")
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.chat, "busy")
            await p.until_sent("busy")
            started = time.monotonic()
            with pytest.raises(Refused) as late:
                await p.chat("late", deadline=0.5, client="b")
            assert late.value.kind == "deadline_exceeded"
            waited = time.monotonic() - started
            assert 0.4 <= waited < 3.0
            assert len(p.route.queue) == 0
            gate.set()
        assert p.adapter.order == ["busy"]


async def test_a_request_that_cannot_be_served_in_time_is_told_at_once_behind_a_queue() -> None:
    async with pool() as p:
        p.key.health = Health.COOLING
        p.key.until = time.monotonic() + 30.0
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(lambda t: p.chat(t, deadline=60.0, client="a"), f"patient{i}")
            await p.until_queued(3)
            started = time.monotonic()
            with pytest.raises(Refused) as caught:
                await p.chat("hurried", deadline=2.0, client="b")
            assert caught.value.kind == "rate_limited"
            assert time.monotonic() - started < 1.0
            assert caught.value.retry_after is not None and caught.value.retry_after > 25
            assert len(p.route.queue) == 3
            tg.cancel_scope.cancel()


async def test_a_cooldown_that_runs_out_serves_the_queue_without_any_other_change() -> None:
    async with pool() as p:
        p.key.health = Health.COOLING
        p.key.until = time.monotonic() + 0.4
        done: list[float] = []
        started = time.monotonic()

        async def send(text: str, client: str) -> None:
            await p.chat(text, client=client, deadline=10.0)
            done.append(time.monotonic() - started)

        async with anyio.create_task_group() as tg:
            head = anyio.CancelScope()

            async def first() -> None:
                with head:
                    await send("head", "a")

            tg.start_soon(first)
            await p.until_queued(1)
            for i, client in enumerate(("b", "c")):
                tg.start_soon(send, f"w{i}", client)
                await p.until_queued(i + 2)
            # The head holds the route's timer; its client hangs up before the key is back.
            head.cancel()
        assert p.adapter.order == ["w0", "w1"]
        assert all(0.35 <= t < 2.0 for t in done), done


async def test_a_waiter_that_hangs_up_as_its_turn_comes_passes_the_turn_on() -> None:
    async with pool() as p:
        gate = p.hold("busy")
        leaving = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.chat, "busy")
            await p.until_sent("busy")

            async def first() -> None:
                with leaving:
                    await p.chat("leaver", client="a")

            tg.start_soon(first)
            await p.until_queued(1)
            tg.start_soon(lambda: p.chat("next", client="b", deadline=10.0))
            await p.until_queued(2)

            def hang_up_when_woken() -> None:
                p.dispatcher.notify()  # wakes "leaver": the key is free
                leaving.cancel()  # ...and its client hangs up before it runs

            p.on_change = hang_up_when_woken
            started = time.monotonic()
            gate.set()
        assert p.adapter.order == ["busy", "next"]
        assert time.monotonic() - started < 2.0
        assert len(p.route.queue) == 0

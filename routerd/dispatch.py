"""The dispatcher: runs one request through its plan, attempt by attempt, until one succeeds.

The routing core (``core.py``) begins each attempt (the lease, in the same event-loop step
as the plan) and settles it; the dispatcher calls the upstream adapter in between and hands
the events the core returns to the log, the credential's actor and the waiters. Key
switches are free; re-trying targets that already failed uses the route's retry budget.
When nothing is free the request waits in the route's fair queue (``queue.py``) for the
earliest reset inside its deadline. Routes for provider/model names that no route names
are made on demand and kept within bounds (``adhoc.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from routerd_client.errors import RouterdError
from routerd_client.protocol import Attempt

from routerd import core
from routerd.actor import CredentialActor
from routerd.adhoc import Route as Route  # lives with the route table; re-exported
from routerd.adhoc import RouteTable
from routerd.outcome import Failure, FailureClass, UpstreamFailure
from routerd.plan import Candidate, Exclusions, Plan, Target, plan
from routerd.queue import Waiter, give_up, hopeless
from routerd.queue import routerd_error as routerd_error  # re-exported, as before
from routerd.tokens import estimate_prompt, output_allowance
from routerd.upstream.base import Adapter, Call, Completion, Delta

log = structlog.get_logger("routerd.dispatch")

OnDelta = Callable[[Delta], Awaitable[None]]
# However many keys and targets a route has, one request makes at most this many attempts.
MAX_ATTEMPTS = 32
# Called once per finished request: (route, target of the last attempt or None, outcome,
# latency in seconds of that last upstream attempt). The metrics hang on it.
Observer = Callable[[str, str | None, str, float], None]


@dataclass(slots=True)
class Reply:
    """A finished request, in the shape the protocol's Result carries."""

    text: str
    model: str
    provider: str
    credential: str
    target: str
    usage: dict[str, int]
    attempts: list[Attempt]
    finish_reason: str | None
    tool_calls: list[dict[str, Any]] | None


@dataclass(slots=True)
class ProviderRuntime:
    """What an attempt needs from a provider besides its credentials."""

    name: str
    adapter: Adapter
    base_url: str
    timeout_s: float
    headers: dict[str, str]


def merge_tool_calls(merged: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Fold OpenAI-style tool-call deltas (keyed by index) into whole tool calls."""
    for delta in deltas:
        index = delta.get("index", len(merged))
        while len(merged) <= index:
            merged.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = merged[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]


class Dispatcher:
    """Routes requests over chains of targets served by pools of credential actors."""

    def __init__(
        self,
        routes: dict[str, Route],
        targets: dict[str, Target],
        actors: dict[tuple[str, str], CredentialActor],
        providers: dict[str, ProviderRuntime],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_change: Callable[[], None] = lambda: None,
        default_deadline_s: float = 120.0,
        observer: Observer | None = None,
        make_target: Callable[[str], Target | None] | None = None,
        max_adhoc_targets: int = 256,
        adhoc_idle_s: float = 600.0,
        on_drop: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._table = RouteTable(
            routes,
            targets,
            make_target,
            deadline_s=default_deadline_s,
            limit=max_adhoc_targets,
            idle_s=adhoc_idle_s,
            on_drop=on_drop,
        )
        self.actors = actors
        self.providers = providers
        self.in_flight = 0
        self._clock = clock
        self._rng = rng or random.Random()
        # Every change of credential and breaker state on the request path happens here.
        self.core = core.RoutingCore(self._rng)
        self.rotations = self.core.rotations
        self._on_change = on_change
        self._observer = observer
        self._idle: anyio.Event | None = None
        # The routes that had waiters since the last notify: only they need a look.
        self._queued: dict[str, Route] = {}

    # ---- routes -----------------------------------------------------------------------

    @property
    def routes(self) -> dict[str, Route]:
        """Every route by name: the config's and the ad-hoc ones."""
        return self._table.routes

    @routes.setter
    def routes(self, routes: dict[str, Route]) -> None:
        self._table.routes = routes

    @property
    def targets(self) -> dict[str, Target]:
        """Every target by name: the config's and the ad-hoc ones."""
        return self._table.targets

    @targets.setter
    def targets(self, targets: dict[str, Target]) -> None:
        self._table.targets = targets

    def resolve(self, name: str) -> Route:
        """The route named ``name``, or a one-target route for a "provider/model" name.

        A target no route names is ad hoc: kept while used, dropped once unused for
        server.adhoc_idle_s, and at most server.max_adhoc_targets of them at once.
        """
        return self._table.resolve(name, self._clock())

    def configure(
        self,
        *,
        default_deadline_s: float,
        max_adhoc_targets: int,
        adhoc_idle_s: float,
        configured: Iterable[str] = (),
    ) -> None:
        """Take a reloaded config's settings; targets it names stop being ad hoc."""
        self._table.configure(default_deadline_s, max_adhoc_targets, adhoc_idle_s, configured)

    def sweep(self, now: float | None = None) -> None:
        """Drop the ad-hoc targets that no request used for server.adhoc_idle_s."""
        self._table.sweep(self._clock() if now is None else now)

    async def wait_idle(self) -> None:
        """Return once no request is in flight (the drain on shutdown waits on this)."""
        if self.in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()

    # ---- waking waiters ---------------------------------------------------------------

    def notify(self) -> None:
        """Capacity may have freed up: on each route, wake the one waiter that may use it."""
        now = self._clock()
        for name, route in list(self._queued.items()):
            if route.queue:
                route.queue.kick(self._assess(route), now)
            else:
                del self._queued[name]

    def _assess(self, route: Route) -> Callable[[int, int, Exclusions, float], Plan]:
        def assess(tokens: int, prompt: int, exclusions: Exclusions, now: float) -> Plan:
            return plan(
                route.chain,
                tokens,
                now,
                prompt_tokens=prompt,
                exclusions=exclusions,
                rotations=self.rotations,
                rng=self._rng,
            )

        return assess

    # ---- one request ------------------------------------------------------------------

    async def chat(
        self,
        route_name: str,
        request: dict[str, Any],
        *,
        stream: bool = False,
        deadline: float | None = None,
        priority: int = 0,
        on_delta: OnDelta | None = None,
        client: str = "",
    ) -> Reply:
        """Serve one request on a route; raises a typed RouterdError when it cannot be served.

        ``client`` names who sent it (a connection or a peer process), so that waiting
        requests are served fairly across clients.
        """
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise routerd_error("bad_request", "request.messages must be a non-empty list")
        route = self.resolve(route_name)
        budget = route.deadline_s if deadline is None else deadline
        if not budget > 0:
            raise routerd_error("bad_request", f"deadline must be positive, got {deadline}")
        started = self._clock()
        deadline_at = started + budget
        attempts: list[Attempt] = []
        self.in_flight += 1
        route.active += 1
        outcome = "cancelled"
        try:
            with anyio.move_on_after(budget):
                reply = await self._serve(
                    route, request, stream, deadline_at, (priority, client), on_delta, attempts
                )
                outcome = "ok"
                return reply
            outcome = "deadline_exceeded"
            raise routerd_error(
                outcome,
                f"route {route.name!r}: no reply within the deadline of {budget:g} s",
                attempts,
            )
        except RouterdError as exc:
            outcome = exc.kind
            raise
        finally:
            self.in_flight -= 1
            route.active -= 1
            self._table.used(route, self._clock())
            if not self.in_flight and self._idle is not None:
                self._idle.set()
            last = attempts[-1] if attempts else None
            log.info(
                "request",
                route=route.name,
                outcome=outcome,
                stream=stream,
                target=last.target if last else None,
                credential=last.credential if last else None,
                attempts=len(attempts),
                ms=round((self._clock() - started) * 1000, 2),
            )
            if self._observer is not None:
                upstream_s = (last.latency_ms or 0.0) / 1000 if last else 0.0
                self._observer(route.name, last.target if last else None, outcome, upstream_s)

    async def _serve(
        self,
        route: Route,
        request: dict[str, Any],
        stream: bool,
        deadline_at: float,
        sender: tuple[int, str],
        on_delta: OnDelta | None,
        attempts: list[Attempt],
    ) -> Reply:
        prompt = estimate_prompt(request)
        tokens = prompt + output_allowance(request)
        exclusions = Exclusions()
        retries_left = route.retries
        queue, assess = route.queue, self._assess(route)
        waiter: Waiter | None = None
        last_failure: Failure | None = None

        def wait_in_line() -> Waiter:
            """This request's place in the queue (taken now, if it has none), not yet granted."""
            if waiter is not None:
                waiter.granted = False
                return waiter
            queued = Waiter(*sender, tokens, prompt, exclusions, deadline_at)
            queue.push(queued)
            self._queued[route.name] = route
            return queued

        def pass_on() -> None:
            """Once this request's lease is taken, the next waiter may use what is left."""
            queue.kick(assess, self._clock())

        try:
            if queue:
                # Others already wait on this route: take a fair place among them, not the
                # front, and go when a walk of the queue says so.
                waiter = wait_in_line()
                queue.kick(assess, self._clock())
                await queue.wait(waiter, assess, self._clock)
            while True:
                now = self._clock()
                decision = assess(tokens, prompt, exclusions, now)
                if decision.candidates and len(attempts) < MAX_ATTEMPTS:
                    leased = None
                    if waiter is not None:
                        queue.remove(waiter, served=True)
                        waiter = None
                        leased = pass_on
                    candidate = decision.candidates[0]
                    outcome = await self._attempt(
                        candidate, request, prompt, tokens, stream, on_delta, attempts, leased
                    )
                    if isinstance(outcome, Reply):
                        return outcome
                    last_failure = outcome
                    core.rule_out(candidate, outcome, exclusions)
                    continue
                if exclusions.down and retries_left > 0 and _all_excluded(route, exclusions):
                    # Every target failed this request once: the retry budget pays for another
                    # round, which the breakers pace (an open breaker makes it wait).
                    retries_left -= 1
                    exclusions.down.clear()
                    continue
                # A long request whose lanes are all cooling is told at once (hopeless), so the
                # agent can compact and resend instead of waiting out the lane.
                if (
                    len(attempts) >= MAX_ATTEMPTS
                    or _all_excluded(route, exclusions)
                    or hopeless(decision, deadline_at)
                ):
                    raise give_up(route.name, decision, attempts, last_failure, now, tokens)
                waiter = wait_in_line()
                queue.kick(assess, now)
                await queue.wait(waiter, assess, self._clock)
        finally:
            if waiter is not None:
                queue.leave(waiter, assess, self._clock())

    async def _attempt(
        self,
        candidate: Candidate,
        request: dict[str, Any],
        prompt: int,
        tokens: int,
        stream: bool,
        on_delta: OnDelta | None,
        attempts: list[Attempt],
        leased: Callable[[], None] | None = None,
    ) -> Reply | Failure:
        """One call with one credential, begun and settled by the core; a Failure means
        try again. ``leased`` runs once the credential is leased, before the first await.
        """
        target, label = candidate.target, candidate.credential.label
        actor = self.actors[(candidate.credential.provider, label)]
        provider = self.providers[target.provider]
        delivered = False

        async def deliver(delta: Delta) -> None:
            nonlocal delivered
            delivered = True
            if on_delta is not None:
                await on_delta(delta)

        ticket, events = self.core.begin(candidate, self._clock(), tokens, prompt)
        # Ending before a reply or a classified failure (client gone, Cancel frame,
        # deadline) is a cancel: either way the finally settles the attempt exactly once.
        result: Completion | Failure | None = None
        try:
            if events:
                self._on_events(actor, events)
            if leased is not None:
                leased()
            call = _call(provider, candidate, actor.secret.key, request)
            try:
                if stream:
                    result = await self._stream(provider.adapter, call, deliver)
                else:
                    result = await provider.adapter.complete(call)
            except UpstreamFailure as exc:
                result = exc.failure
        finally:
            done = self._clock()
            latency_ms = (done - ticket.started) * 1000
            outcome = _outcome(result, latency_ms)
            self._on_events(actor, self.core.settle(ticket, outcome, done))
        return _finish(candidate, result, round(latency_ms, 2), delivered, attempts)

    def _on_events(self, actor: CredentialActor, events: list[core.Event]) -> None:
        """Hand what the core did to the credential's actor and the log, then wake waiters
        (once: the actor's log of the same events wakes no one).
        """
        for event in events:
            if isinstance(event, core.BreakerOpened | core.BreakerSuspect):
                name = "opened" if isinstance(event, core.BreakerOpened) else "suspect"
                log.info(
                    f"breaker_{name}", target=event.target, was=event.was.value, reason=event.reason
                )
            elif isinstance(event, core.BreakerClosed):
                log.info("breaker_closed", target=event.target, was=event.was.value, reason="")
            elif isinstance(event, core.BreakerHalfOpen):
                log.debug("breaker_half_open", target=event.target)
            else:
                actor.report(event)
        self._on_change()

    async def _stream(self, adapter: Adapter, call: Call, deliver: OnDelta) -> Completion:
        parts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        async with adapter.stream(call) as upstream:
            async for delta in upstream:
                if delta.text:
                    parts.append(delta.text)
                if delta.tool_calls:
                    merge_tool_calls(tool_calls, delta.tool_calls)
                await deliver(delta)
            return Completion(
                text="".join(parts),
                model=upstream.model,
                finish_reason=upstream.finish_reason,
                usage=upstream.usage,
                limits=upstream.limits,
                tool_calls=tool_calls or None,
            )


def _merge_headers(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """``extra`` over ``base``; list-valued beta headers are joined, not replaced."""
    merged = dict(base)
    for name, value in extra.items():
        current = merged.get(name)
        merged[name] = f"{current},{value}" if current and name.endswith("-beta") else value
    return merged


def _call(provider: ProviderRuntime, candidate: Candidate, key: str, body: dict[str, Any]) -> Call:
    headers = provider.headers
    if candidate.long and candidate.target.long_context_headers:
        headers = _merge_headers(headers, candidate.target.long_context_headers)
    return Call(
        base_url=provider.base_url,
        model=candidate.target.model,
        key=key,
        body=body,
        timeout=provider.timeout_s,
        headers=headers,
    )


def _outcome(result: Completion | Failure | None, latency_ms: float) -> core.Outcome:
    """What the core settles for an attempt that ended with ``result`` (None: cancelled)."""
    if result is None:
        return core.CANCELLED
    if isinstance(result, Failure):
        return result
    return core.Success(latency_ms, result.limits, result.usage.get("prompt_tokens", 0))


def _finish(
    candidate: Candidate,
    result: Completion | Failure,
    latency_ms: float,
    delivered: bool,
    attempts: list[Attempt],
) -> Reply | Failure:
    """Record a settled attempt; the reply, or the failure when another attempt may follow."""
    target, label = candidate.target, candidate.credential.label
    if isinstance(result, Failure):
        kind, message = result.cls.value, result.message
        attempts.append(Attempt(target.name, label, kind, result.status, latency_ms, message))
        if delivered or result.cls is FailureClass.BAD_REQUEST:
            # A stream that already reached the client cannot move elsewhere, and a bad
            # request would fail the same way anywhere.
            if delivered:
                message = f"stream failed after it began: {message}"
            details = result.details or None
            raise routerd_error(kind, message, attempts, result.retry_after, details) from None
        return result
    attempts.append(Attempt(target.name, label, "ok", 200, latency_ms))
    return Reply(
        text=result.text,
        model=result.model or target.model,
        provider=target.provider,
        credential=label,
        target=target.name,
        usage=result.usage,
        attempts=attempts,
        finish_reason=result.finish_reason,
        tool_calls=result.tool_calls,
    )


def _all_excluded(route: Route, exclusions: Exclusions) -> bool:
    return all(exclusions.excludes(target.name) for target in route.chain)

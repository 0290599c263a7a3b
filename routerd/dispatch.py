"""The dispatcher: runs one request through its plan, attempt by attempt, until one succeeds.

Each attempt leases a credential (synchronously, in the same event-loop step as the plan),
calls the upstream adapter, and settles the outcome on the credential and the target's
breaker. Key switches are free; re-trying targets that already failed uses the route's
retry budget. When nothing is free the request waits in the route's fair queue
(``queue.py``) for the earliest reset inside its deadline. Routes for provider/model names
that no route names are made on demand and kept within bounds (``adhoc.py``).
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

from routerd.actor import CredentialActor
from routerd.adhoc import Route as Route  # lives with the route table; re-exported
from routerd.adhoc import RouteTable
from routerd.credential import Health
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
        self.rotations: dict[str, int] = {}
        self.in_flight = 0
        self._clock = clock
        self._rng = rng or random.Random()
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
                    self._exclude(candidate, outcome, exclusions)
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

    @staticmethod
    def _exclude(candidate: Candidate, failure: Failure, exclusions: Exclusions) -> None:
        """Rule out, for this request only, what the failure says cannot serve it.

        A cooling credential needs no entry: the plan skips it until its reset anyway.
        """
        cls = failure.cls
        if cls is FailureClass.TARGET_DOWN:
            exclusions.down.add(candidate.target.name)
        elif cls is FailureClass.CONTEXT_OVERFLOW:
            if candidate.long or candidate.target.long_context_window is None:
                exclusions.targets.add(candidate.target.name)
            else:
                # Our estimate put it inside the normal window; the provider counts more.
                exclusions.long_only.add(candidate.target.name)
        elif cls in (FailureClass.QUOTA_EXHAUSTED, FailureClass.AUTH_FAILED) or (
            cls is FailureClass.RATE_LIMITED and failure.oversized
        ):
            exclusions.credentials.add((candidate.credential.provider, candidate.credential.label))

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
        """One call with one credential; settles its outcome; a Failure means try again.

        ``leased`` runs once the credential is leased, before the first await.
        """
        target = candidate.target
        credential = candidate.credential
        actor = self.actors[(credential.provider, credential.label)]
        provider = self.providers[target.provider]
        now = self._clock()
        before = credential.current_health(now)
        lease = credential.lease(now, tokens, long=candidate.long)
        self.rotations[target.provider] = self.rotations.get(target.provider, 0) + 1
        probe = target.breaker.dispatched(now)
        if leased is not None:
            leased()
        headers = provider.headers
        if candidate.long and target.long_context_headers:
            headers = _merge_headers(headers, target.long_context_headers)
        call = Call(
            base_url=provider.base_url,
            model=target.model,
            key=actor.secret.key,
            body=request,
            timeout=provider.timeout_s,
            headers=headers,
        )
        delivered = False

        async def deliver(delta: Delta) -> None:
            nonlocal delivered
            delivered = True
            if on_delta is not None:
                await on_delta(delta)

        settled = False
        try:
            try:
                if stream:
                    completion = await self._stream(provider.adapter, call, deliver)
                else:
                    completion = await provider.adapter.complete(call)
            except UpstreamFailure as exc:
                failure = exc.failure
                done = self._clock()
                latency_ms = (done - now) * 1000
                credential.failed(failure, done, self._rng, lease)
                if failure.cls is FailureClass.TARGET_DOWN:
                    breaker_before = target.breaker.failed(done, probe)
                    if breaker_before is not target.breaker.state:
                        _log_breaker(target, breaker_before.value, failure.message)
                else:
                    target.breaker.released(probe)
                settled = True
                actor.report(before)
                self._on_change()
                attempts.append(
                    Attempt(
                        target=target.name,
                        credential=credential.label,
                        outcome=failure.cls.value,
                        status=failure.status,
                        latency_ms=round(latency_ms, 2),
                        message=failure.message,
                    )
                )
                if delivered or failure.cls is FailureClass.BAD_REQUEST:
                    # A stream that already reached the client cannot move elsewhere, and a
                    # bad request would fail the same way anywhere.
                    raise routerd_error(
                        failure.cls.value,
                        failure.message
                        if not delivered
                        else f"stream failed after it began: {failure.message}",
                        attempts,
                        failure.retry_after,
                        failure.details or None,
                    ) from None
                return failure
            done = self._clock()
            latency_ms = (done - now) * 1000
            credential.succeeded(done, latency_ms, completion.limits, lease)
            target.learn_tokens(prompt, completion.usage.get("prompt_tokens", 0))
            breaker_before = target.breaker.succeeded(latency_ms, probe)
            if breaker_before is not target.breaker.state:
                _log_breaker(target, breaker_before.value, "")
            settled = True
            if before is not Health.READY:
                actor.report(before)
            self._on_change()
            attempts.append(
                Attempt(
                    target=target.name,
                    credential=credential.label,
                    outcome="ok",
                    status=200,
                    latency_ms=round(latency_ms, 2),
                )
            )
            return Reply(
                text=completion.text,
                model=completion.model or target.model,
                provider=target.provider,
                credential=credential.label,
                target=target.name,
                usage=completion.usage,
                attempts=attempts,
                finish_reason=completion.finish_reason,
                tool_calls=completion.tool_calls,
            )
        finally:
            if not settled:
                # Cancelled (client gone, Cancel frame, deadline): no verdict on key or target.
                credential.release(lease)
                target.breaker.released(probe)
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


def _all_excluded(route: Route, exclusions: Exclusions) -> bool:
    return all(exclusions.excludes(target.name) for target in route.chain)


def _log_breaker(target: Target, before: str, reason: str) -> None:
    after = target.breaker.state.value
    event = "breaker_opened" if after == "open" else f"breaker_{after}"
    if after == "closed":
        event = "breaker_closed"
    log.info(event, target=target.name, was=before, reason=reason)

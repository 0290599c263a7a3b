"""The dispatcher: runs one request through its plan, attempt by attempt, until one succeeds.

The routing core (``core/routing.py``) begins each attempt (the lease, in the same event-loop
step as the plan) and settles it; the dispatcher calls the upstream adapter in between
(``attempt.py`` builds the call and records its result) and hands the events the core
returns to the log, the credential's actor and the waiters. A reply goes back to its front
before its attempt is settled and logged (``catch_up``: on the loop's next turn, or before
the next plan, status or snapshot); a failure is settled at once. Key switches are free;
re-trying targets that already failed uses the route's retry budget.
When nothing is free the request waits in the route's fair queue (``queue.py``) for the
earliest reset inside its deadline. Routes for provider/model names that no route names
are made on demand and kept within bounds (``routes.py``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import anyio
import structlog

from routerd.core import routing as core
from routerd.core.affinity import Affinity, session_in, session_key
from routerd.core.calls import Completion, Delta, Reply
from routerd.core.errors import Refused
from routerd.core.outcome import Failure, UpstreamFailure
from routerd.core.plan import Candidate, Exclusions, Plan, Target, plan
from routerd.core.tokens import estimate_prompt, output_allowance
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.attempt import (
    ProviderRuntime,
    build_call,
    record,
    settled_outcome,
    streamed,
)
from routerd.dispatch.job import MAX_ATTEMPTS, Job, OnDelta
from routerd.dispatch.queue import Waiter, give_up
from routerd.dispatch.routes import Route, RouteTable
from routerd.dispatch.sharing import Sharing
from routerd.dispatch.sticky import place, placed_among_all

log = structlog.get_logger("routerd.dispatch")

# Called once per finished request: (route, target of the last attempt or None, outcome,
# latency in seconds of that last upstream attempt). The metrics hang on it.
Observer = Callable[[str, str | None, str, float], None]


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
        sharing: Sharing | None = None,
        affinity: Affinity | None = None,
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
        self.affinity = affinity if affinity is not None else Affinity()
        self.in_flight = 0
        self._clock = clock
        self._rng = rng or random.Random()
        # Every change of credential and breaker state on the request path happens here.
        self.core = core.RoutingCore(self._rng)
        self.rotations = self.core.rotations
        self._on_change = on_change
        self._observer = observer
        # The hosts sharing these keys ([state] backend = "redis"), told of each attempt.
        self.sharing = sharing
        self._idle: anyio.Event | None = None
        # The routes that had waiters since the last notify: only they need a look.
        self._queued: dict[str, Route] = {}
        # What replies left to do (settling their attempts, their log lines), done once the
        # reply is on its way to its client: on the loop's next turn, or before the next
        # plan, status or state snapshot, whichever comes first (catch_up).
        self._owed: list[Callable[[], None]] = []

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
        """Drop the ad-hoc targets that no request used for server.adhoc_idle_s (status and
        /metrics call this first: it also settles the replies just sent)."""
        self.catch_up()
        self._table.sweep(self._clock() if now is None else now)

    async def wait_idle(self) -> None:
        """Return once no request is in flight (the drain on shutdown waits on this)."""
        if self.in_flight:
            self._idle = anyio.Event()
            await self._idle.wait()
        self.catch_up()

    # ---- waking waiters ---------------------------------------------------------------

    def notify(self) -> None:
        """Capacity may have freed up: on each route, wake the one waiter that may use it."""
        now = self._clock()
        for name, route in list(self._queued.items()):
            if route.queue:
                route.queue.kick(self._assess(route), now)
            else:
                # pop: a kick's plan settles owed replies, whose events notify again (re-entry)
                self._queued.pop(name, None)

    def _assess(
        self, route: Route, *, first_only: bool = True
    ) -> Callable[[int, int, Exclusions, float], Plan]:
        """The route's plan at a time; ``first_only``: just its first candidate, if any."""

        def assess(tokens: int, prompt: int, exclusions: Exclusions, now: float) -> Plan:
            if self._owed:
                self.catch_up()
            return plan(
                route.chain,
                tokens,
                now,
                prompt_tokens=prompt,
                exclusions=exclusions,
                rotations=self.rotations,
                rng=self._rng,
                first_only=first_only,
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
        prompt_tokens: int | None = None,
        session: str | None = None,
    ) -> Reply:
        """Serve one request on a route; raises Refused when it cannot be served.

        ``client`` names who sent it (a connection or a peer process), so that waiting
        requests are served fairly across clients. ``prompt_tokens`` is the prompt's
        estimate when the front has made it already (one walk over a long prompt, not two).
        ``session`` names the conversation: its turns stay where its prompt cache is.
        """
        try:
            route = self.resolve(route_name)
            budget = route.deadline_s if deadline is None else deadline
            if not budget > 0:
                raise Refused("bad_request", f"deadline must be positive, got {deadline}")
        except Refused as exc:
            self.refused(exc.kind)
            raise
        started = self._clock()
        job = Job(route, request, stream, on_delta, started + budget, (priority, client))
        job.retries_left = route.retries
        session = session or session_in(request)
        if session and self.affinity.enabled:
            job.session = session_key(session)
        self.in_flight += 1
        route.active += 1
        outcome = "cancelled"
        try:
            with anyio.move_on_after(budget):
                job.prompt = estimate_prompt(request) if prompt_tokens is None else prompt_tokens
                job.tokens = job.prompt + output_allowance(request)
                reply = await self._serve(job)
                outcome = "ok"
                return reply
            outcome = "deadline_exceeded"
            message = f"route {route.name!r}: no reply within the deadline of {budget:g} s"
            raise Refused(outcome, message, job.attempts)
        except Refused as exc:
            outcome = exc.kind
            raise
        finally:
            self._finished(job, outcome, started)

    def refused(self, kind: str) -> None:
        """Count a request refused before it was routed (unknown route, malformed request):
        its route label is empty, since a client may name any route."""
        if self._observer is not None:
            self._observer("", None, kind, 0.0)

    def _finished(self, job: Job, outcome: str, started: float) -> None:
        """A request ended: free its place now; its log line and the observer follow a
        reply (catch_up), and come at once for anything else."""
        self.in_flight -= 1
        job.route.active -= 1
        ended = self._clock()
        self._table.used(job.route, ended)
        if not self.in_flight and self._idle is not None:
            self._idle.set()
        if outcome == "ok":
            self._owe(partial(self._account, job, outcome, ended - started))
        else:
            self._account(job, outcome, ended - started)

    def _account(self, job: Job, outcome: str, took_s: float) -> None:
        """A request's one log line, and the observer's count of it."""
        last = job.attempts[-1] if job.attempts else None
        # A failed request is a warning, so filtering warnings shows an outage; a reply, or
        # a client that cancelled its own request, is routine.
        emit = log.info if outcome in ("ok", "cancelled") else log.warning
        emit(
            "request",
            route=job.route.name,
            outcome=outcome,
            stream=job.stream,
            target=last.target if last else None,
            credential=last.credential if last else None,
            attempts=len(job.attempts),
            ms=round(took_s * 1000, 2),
        )
        if self._observer is not None:
            upstream_s = (last.latency_ms or 0.0) / 1000 if last else 0.0
            self._observer(job.route.name, last.target if last else None, outcome, upstream_s)

    async def _serve(self, job: Job) -> Reply:
        """Attempt candidates in plan order, waiting in the route's queue when none is free."""
        route = job.route
        queue, assess = route.queue, self._assess(route, first_only=not placed_among_all(job))
        waiter: Waiter | None = None

        def wait_in_line() -> Waiter:
            """This request's place in the queue (taken now, if it has none), not yet granted."""
            if waiter is not None:
                waiter.granted = False
                return waiter
            queued = Waiter(*job.sender, job.tokens, job.prompt, job.exclusions, job.deadline_at)
            queue.push(queued)
            self._queued[route.name] = route
            return queued

        try:
            if queue:
                # Others already wait on this route: take a fair place among them, not the
                # front, and go when a walk of the queue says so.
                waiter = wait_in_line()
                queue.kick(assess, self._clock())
                await queue.wait(waiter, assess, self._clock)
            while True:
                now = self._clock()
                decision = assess(job.tokens, job.prompt, job.exclusions, now)
                if decision.candidates and len(job.attempts) < MAX_ATTEMPTS:
                    leased = None
                    if waiter is not None:
                        queue.remove(waiter, served=True)
                        waiter = None
                        # Once this lease is taken, the next waiter may use what is left.
                        leased = partial(queue.kick, assess, now)
                    candidate = decision.candidates[0]
                    if job.session is not None:
                        candidate = place(self.affinity, job, decision, now, count=not job.placed)
                        job.placed = True
                    outcome = await self._attempt(candidate, job, leased)
                    if isinstance(outcome, Reply):
                        if job.session is not None:
                            self.affinity.served(job.session, candidate, self._clock())
                        return outcome
                    continue
                if job.retry_round():
                    continue
                if decision.partial:
                    # Out of attempts with a candidate left: the full plan says why.
                    decision = self._assess(route, first_only=False)(
                        job.tokens, job.prompt, job.exclusions, now
                    )
                if job.beyond_help(decision):
                    raise give_up(
                        route.name, decision, job.attempts, job.last_failure, now, job.tokens
                    )
                waiter = wait_in_line()
                queue.kick(assess, now)
                await queue.wait(waiter, assess, self._clock)
        finally:
            if waiter is not None:
                queue.leave(waiter, assess, self._clock())

    async def _attempt(
        self, candidate: Candidate, job: Job, leased: Callable[[], None] | None = None
    ) -> Reply | Failure | None:
        """One call with one credential, begun and settled by the core; a Failure means
        try again, None that the hosts sharing the key left no room for it now (plan again:
        the key is held until they do). ``leased`` runs once the credential is leased,
        before the first await.
        """
        target, label = candidate.target, candidate.credential.label
        actor = self.actors[(candidate.credential.provider, label)]
        provider = self.providers[target.provider]
        delivered = False

        async def deliver(delta: Delta) -> None:
            nonlocal delivered
            delivered = True
            if job.on_delta is not None:
                await job.on_delta(delta)

        ticket, events = self.core.begin(candidate, self._clock(), job.tokens, job.prompt)
        # Ending before a reply or a classified failure (client gone, Cancel frame,
        # deadline) is a cancel: either way the finally settles the attempt exactly once.
        result: Completion | Failure | None = None
        sent = True
        try:
            if events:
                self._on_events(actor, events)
            if leased is not None:
                leased()
            if self.sharing is not None:
                sent = False  # until the fleet lets it go (a cancel may come meanwhile)
                if not await self.sharing.begun(candidate, ticket):
                    return None
                sent = True
            call = build_call(provider, candidate, actor.secret.key, job.request)
            try:
                if job.stream:
                    result = await streamed(provider.adapter, call, deliver)
                else:
                    result = await provider.adapter.complete(call)
            except UpstreamFailure as exc:
                result = exc.failure
        finally:
            done = self._clock()
            latency_ms = (done - ticket.started) * 1000
            outcome = settled_outcome(result, latency_ms) if sent else core.NOT_SENT
            settle = partial(self._settle, actor, candidate, ticket, outcome, done)
            if isinstance(result, Completion):
                self._owe(settle)  # the reply first; a failure is settled before the next plan
            else:
                settle()
        settled = record(candidate, result, round(latency_ms, 2), delivered, job.attempts)
        if isinstance(settled, Failure):
            job.last_failure = settled
            core.rule_out(candidate, settled, job.exclusions)
        return settled

    def _settle(
        self,
        actor: CredentialActor,
        candidate: Candidate,
        ticket: core.AttemptTicket,
        outcome: core.Outcome,
        now: float,
    ) -> None:
        events = self.core.settle(ticket, outcome, now)
        self._on_events(actor, events)
        if self.sharing is not None:
            self.sharing.settled(candidate, ticket, events)

    def _owe(self, work: Callable[[], None]) -> None:
        if not self._owed:
            asyncio.get_running_loop().call_soon(self.catch_up)
        self._owed.append(work)

    def catch_up(self) -> None:
        """Do what replies left to do, so that what follows sees every reply settled."""
        owed, self._owed = self._owed, []
        for work in owed:
            try:
                work()
            except Exception:
                log.exception("settle_crashed")

    def _on_events(self, actor: CredentialActor, events: list[core.Event]) -> None:
        """Hand what the core did to the credential's actor and the log, then wake waiters
        (once: the actor's log of the same events wakes no one).
        """
        for event in events:
            if isinstance(event, core.BreakerOpened | core.BreakerSuspect):
                name = "opened" if isinstance(event, core.BreakerOpened) else "suspect"
                log.warning(
                    f"breaker_{name}", target=event.target, was=event.was.value, reason=event.reason
                )
            elif isinstance(event, core.BreakerClosed):
                log.warning("breaker_closed", target=event.target, was=event.was.value, reason="")
            elif isinstance(event, core.BreakerHalfOpen):
                log.debug("breaker_half_open", target=event.target)
            else:
                actor.report(event)
        self._on_change()

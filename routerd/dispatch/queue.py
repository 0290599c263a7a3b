"""Waiting for capacity: who on a route goes next, and what a request is told when waiting
cannot help.

Waiters are served by priority first. Within a priority they are served fairly across
clients by start-time fair queuing: a waiter's virtual start is one past the later of the
priority's virtual time (the start of the last waiter served) and its client's previous
waiter, so a client with 500 queued requests and one with 5 take turns, while each
client's own requests keep their order.

``admit`` is the decision, pure and synchronous like ``plan``: it walks the queue in that
order and names the one waiter that may go now, or when to look again. It plans only for
waiters that could plausibly proceed, so a change wakes one task rather than every waiter.
``FairQueue.kick`` acts on it: it wakes that one waiter, which plans for itself, leases,
and kicks again (the baton), or it arms the route's timer on the head of the queue.

``hopeless`` says when a request should stop waiting; ``give_up`` builds what it is told.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anyio

from routerd.core.calls import Attempt
from routerd.core.errors import Refused
from routerd.core.outcome import Failure, FailureClass
from routerd.core.plan import Exclusions, Plan

# The shortest sleep of a waiter whose timer came due without a grant.
MIN_SLEEP_S = 0.001
# Waiters planned one by one in a walk, beyond those a blocked empty request rules out.
# Past this many the walk stops: the rest wait for the next change or the route's timer.
MAX_PLANS = 16

# (tokens, prompt tokens, exclusions, now) -> the plan for such a request at ``now``.
Assess = Callable[[int, int, Exclusions, float], Plan]


@dataclass(slots=True, eq=False)
class Waiter:
    """One request waiting for capacity on a route.

    ``exclusions`` is the request's own object, so a walk plans with what the request has
    ruled out so far. ``granted``: a walk found that it may go (it plans again itself when
    it runs). ``wake_at``: when its sleep ends on its own; only the waiter that holds the
    route's timer (the head, usually) has a finite one.
    """

    priority: int
    client: str
    tokens: int
    prompt: int
    exclusions: Exclusions
    deadline_at: float
    seq: int = 0
    arrival: int = 0
    granted: bool = False
    wake_at: float = math.inf
    event: anyio.Event = field(default_factory=anyio.Event)

    @property
    def key(self) -> tuple[int, int, int]:
        """The waiter's place: higher priority first, then virtual start, then arrival."""
        return (-self.priority, self.seq, self.arrival)


@dataclass(frozen=True, slots=True)
class Admission:
    """What a walk decided: the waiter to wake (None: no one), else when to look again.

    ``wake_at`` is ``math.inf`` when only a change (a finished request) can free capacity.
    """

    waiter: Waiter | None
    wake_at: float = math.inf


class FairQueue:
    """The waiters of one route in the order they get capacity."""

    def __init__(self) -> None:
        self._waiters: list[Waiter] = []
        self._keys: list[tuple[int, int, int]] = []
        # Per priority: the virtual start of the last waiter served.
        self._virtual: dict[int, int] = {}
        # Per (priority, client): [virtual start of its last waiter, how many wait].
        self._clients: dict[tuple[int, str], list[int]] = {}
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    @property
    def head(self) -> Waiter | None:
        """The waiter first in line, if any."""
        return self._waiters[0] if self._waiters else None

    def push(self, waiter: Waiter) -> None:
        """Queue ``waiter`` at its fair place: behind its own client's, among the others'."""
        priority = waiter.priority
        entry = self._clients.setdefault((priority, waiter.client), [0, 0])
        waiter.seq = max(self._virtual.get(priority, 0), entry[0]) + 1
        waiter.arrival = next(self._arrivals)
        entry[0] = waiter.seq
        entry[1] += 1
        key = waiter.key
        index = bisect.bisect(self._keys, key)
        self._keys.insert(index, key)
        self._waiters.insert(index, waiter)

    def remove(self, waiter: Waiter, *, served: bool) -> bool:
        """Take ``waiter`` out: ``served`` when it got capacity, else it gave up or left.

        Returns whether it was queued.
        """
        index = bisect.bisect_left(self._keys, waiter.key)
        if index == len(self._waiters) or self._waiters[index] is not waiter:
            return False
        del self._keys[index]
        del self._waiters[index]
        priority = waiter.priority
        client = (priority, waiter.client)
        entry = self._clients[client]
        entry[1] -= 1
        if not entry[1]:
            # A client with nothing queued starts afresh at the virtual time, as in SFQ.
            del self._clients[client]
        if served:
            self._virtual[priority] = max(self._virtual.get(priority, 0), waiter.seq)
        if not any(w.priority == priority for w in self._neighbours(index)):
            # Clients pick priorities freely: forget a level nobody waits at.
            self._virtual.pop(priority, None)
        return True

    def _neighbours(self, index: int) -> list[Waiter]:
        # Waiters of one priority are contiguous, so these two tell whether any is left.
        return self._waiters[max(0, index - 1) : index + 1]

    # ---- waking -----------------------------------------------------------------------

    def kick(self, assess: Assess, now: float) -> None:
        """Capacity may have changed: wake the waiter that may go, or arm the route's timer.

        The timer rides on the head: it sleeps until the earliest time any waiter could go,
        then kicks again.
        """
        head = self.head
        if head is None:
            return
        admission = admit(self, lambda t, p, e: assess(t, p, e, now))
        if admission.waiter is not None:
            admission.waiter.granted = True
            admission.waiter.event.set()
            return
        if admission.wake_at != head.wake_at:
            earlier = admission.wake_at < head.wake_at
            head.wake_at = admission.wake_at
            if earlier:
                head.event.set()  # it sleeps on a later time: it must re-arm

    async def wait(self, waiter: Waiter, assess: Assess, clock: Callable[[], float]) -> None:
        """Sleep until a kick grants ``waiter`` its turn (its deadline is the caller's scope)."""
        while not waiter.granted:
            delay = waiter.wake_at - clock()
            if delay <= 0:
                # The route's timer is due: look again at the whole queue.
                waiter.wake_at = math.inf
                self.kick(assess, clock())
                if waiter.granted:
                    return
                # A plan never frees up at ``now`` without a candidate; a tick guards a loop.
                delay = max(waiter.wake_at - clock(), MIN_SLEEP_S)
            waiter.event = anyio.Event()
            with anyio.move_on_after(delay):
                await waiter.event.wait()
        # Woken and cancelled in one step (its client hung up as its turn came): leave now,
        # before a lease and an upstream call, so the turn passes on at once.
        await anyio.lowlevel.checkpoint_if_cancelled()

    def leave(self, waiter: Waiter, assess: Assess, now: float) -> None:
        """``waiter`` gives up or is cancelled; a grant or a timer it held passes on."""
        if self.remove(waiter, served=False) and (waiter.granted or waiter.wake_at < math.inf):
            self.kick(assess, now)


def hopeless(decision: Plan, deadline_at: float) -> bool:
    """Whether a request that found no candidate should give up now rather than wait.

    ``free_at`` of ``math.inf`` (a busy max_concurrent key, a running probe) is not too
    late: the next finished request frees it, so the request waits within its deadline.
    """
    return (
        not _may_wait(decision.free_at, deadline_at)
        or decision.blocked is FailureClass.LONG_CONTEXT_LIMITED
    )


def admit(queue: FairQueue, assess: Callable[[int, int, Exclusions], Plan]) -> Admission:
    """Walk ``queue`` in order: the first waiter that can go now (or must give up) is named.

    A request of no size is the easiest to serve (the floor): when even it is blocked under
    some exclusions, every waiter whose exclusions include those is blocked too, and is
    skipped without a plan unless the floor frees up too late for its deadline (then its own
    plan says whether it gives up). So a walk over a homogeneous queue plans twice, however
    long it is. ``wake_at`` is the earliest time any waiter could go, for the route's timer.
    """
    floors: list[tuple[Exclusions, float | None]] = []
    # Once the floor with no exclusions is blocked, it covers every waiter (the fast path).
    universal = False
    universal_at: float | None = None
    wake_at = math.inf
    planned = 0
    for waiter in queue:
        covered = universal or any(_includes(waiter.exclusions, floor) for floor, _ in floors)
        if covered:
            floor_at = universal_at if universal else _latest(waiter, floors)
            if _may_wait(floor_at, waiter.deadline_at):
                continue
        if planned >= MAX_PLANS:
            break
        planned += 1
        decision = assess(waiter.tokens, waiter.prompt, waiter.exclusions)
        if decision.candidates or hopeless(decision, waiter.deadline_at):
            return Admission(waiter, wake_at)
        wake_at = min(wake_at, _at(decision.free_at))
        if covered:
            continue
        floor = assess(0, 0, waiter.exclusions)
        if not floor.candidates:
            floors.append((waiter.exclusions, floor.free_at))
            wake_at = min(wake_at, _at(floor.free_at))
            if _empty(waiter.exclusions):
                universal, universal_at = True, floor.free_at
    return Admission(None, wake_at)


def _may_wait(free_at: float | None, deadline_at: float) -> bool:
    """Whether capacity that frees up at ``free_at`` may still come inside the deadline."""
    return free_at is not None and (free_at == math.inf or free_at < deadline_at)


def _latest(waiter: Waiter, floors: list[tuple[Exclusions, float | None]]) -> float | None:
    """The latest free-up time of the floors that cover ``waiter`` (its tightest bound).

    None when one of them never frees up.
    """
    times = [at for floor, at in floors if _includes(waiter.exclusions, floor)]
    if any(at is None for at in times):
        return None
    return max(at for at in times if at is not None)


def _at(free_at: float | None) -> float:
    return math.inf if free_at is None else free_at


def _empty(exclusions: Exclusions) -> bool:
    return not (
        exclusions.down or exclusions.targets or exclusions.long_only or exclusions.credentials
    )


def _includes(outer: Exclusions, inner: Exclusions) -> bool:
    """Whether ``outer`` rules out at least what ``inner`` does (so it is no easier to serve)."""
    return (
        inner.down <= outer.down
        and inner.targets <= outer.targets
        and inner.long_only <= outer.long_only
        and inner.credentials <= outer.credentials
    )


def give_up(
    route: str,
    decision: Plan,
    attempts: list[Attempt],
    last: Failure | None,
    now: float,
    tokens: int,
) -> Refused:
    """The error for a request that nothing can serve within its deadline.

    It names the failure class that stands in the way and, where waiting would help, when
    to retry.
    """
    retry_after = None
    if decision.free_at is not None and decision.free_at < math.inf:
        retry_after = decision.free_at - now
    if decision.blocked is not None:
        kind = decision.blocked.value
    elif last is not None:
        kind = last.cls.value
    else:
        kind = FailureClass.TARGET_DOWN.value
    last_error = f"; last error: {last.message}" if last is not None else ""
    if kind == FailureClass.LONG_CONTEXT_LIMITED.value:
        back_in = None
        if decision.long_lane_back_at is not None:
            back_in = round(max(0.0, decision.long_lane_back_at - now), 3)
        window = decision.available_window
        return Refused(
            "context_tier_downgrade",
            f"route {route!r}: every long-context lane that could hold about {tokens} "
            f"tokens is cooling; the largest window available now is {window} tokens, "
            f"long context expected back in {back_in} s{last_error}",
            attempts,
            back_in,
            {
                "largest_window": window,
                "long_lane_back_in": back_in,
                "requested_tokens": tokens,
            },
        )
    if kind == FailureClass.CONTEXT_OVERFLOW.value:
        return Refused(
            kind,
            f"route {route!r}: the request needs about {tokens} tokens; the largest "
            f"context window in its chain is {decision.largest_window}{last_error}",
            attempts,
            None,
            {"requested_tokens": tokens, "largest_window": decision.largest_window},
        )
    reasons = {
        "rate_limited": "every credential is cooling past the deadline",
        "quota_exhausted": "every credential is out of quota",
        "auth_failed": "every credential failed authentication",
        "target_down": "every target is down",
    }
    message = f"route {route!r}: {reasons.get(kind, 'no target could serve it')}"
    return Refused(kind, message + last_error, attempts, retry_after)

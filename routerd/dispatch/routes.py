"""Routes by name: the config's, and the ad-hoc ones that requests make by naming a target.

Any client may name any provider/model, so what such names create (a target, its
one-target route, their metrics series and state-file records) must not grow without end.
Targets no route names are kept in least-recently-used order: one that no request used for
``idle_s`` is dropped, at most ``limit`` live at once (to make room, the least recently used
idle one goes first), and one that a request still uses, running or queued, is never
dropped. The config's routes and targets are never touched. Time comes in as ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from routerd.core.errors import Refused
from routerd.core.plan import Target
from routerd.dispatch.queue import FairQueue

log = structlog.get_logger("routerd.dispatch")

# A client refused at the cap is told to retry after this long: requests on the other
# ad-hoc targets typically end within seconds and free a place.
RETRY_S = 1.0
# An ad-hoc route's retry budget, as a configured route's default.
RETRIES = 2


@dataclass(slots=True)
class Route:
    """A named chain of targets and the budget a request on it gets."""

    name: str
    chain: list[Target]
    deadline_s: float
    retries: int
    queue: FairQueue = field(default_factory=FairQueue)
    # Requests on the route now, running or queued: an ad-hoc route in use is never dropped.
    active: int = 0


class AdhocTargets:
    """The names of the ad-hoc targets alive now, least recently used first (pure)."""

    def __init__(self, limit: int, idle_s: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._used: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._used)

    def __contains__(self, name: object) -> bool:
        return name in self._used

    def touch(self, name: str, now: float) -> None:
        """``name`` is (still) in use at ``now``; it becomes the most recently used."""
        self._used[name] = now
        self._used.move_to_end(name)

    def discard(self, name: str) -> None:
        """Forget ``name``."""
        self._used.pop(name, None)

    def expired(self, now: float, busy: Callable[[str], bool]) -> list[str]:
        """The names unused for ``idle_s`` that no request uses: to drop now."""
        names: list[str] = []
        for name, used in self._used.items():
            if now - used < self.idle_s:
                break  # the rest were used more recently still
            if not busy(name):
                names.append(name)
        return names

    def evictable(self, busy: Callable[[str], bool]) -> str | None:
        """The least recently used name that no request uses, if any."""
        return next((name for name in self._used if not busy(name)), None)


class RouteTable:
    """Resolves names to routes; ``routes`` and ``targets`` are the dicts the daemon reads."""

    def __init__(
        self,
        routes: dict[str, Route],
        targets: dict[str, Target],
        make_target: Callable[[str], Target | None] | None,
        *,
        deadline_s: float,
        limit: int,
        idle_s: float,
        on_drop: Callable[[str], None],
    ) -> None:
        self.routes = routes
        self.targets = targets
        # The targets given here are the config's: only those made later are ad hoc.
        self.adhoc = AdhocTargets(limit, idle_s)
        self._make_target = make_target
        self._deadline_s = deadline_s
        self._on_drop = on_drop

    def resolve(self, name: str, now: float) -> Route:
        """The route named ``name``, or a one-target route for a "provider/model" name."""
        route = self.routes.get(name)
        if route is not None:
            self.used(route, now)
            return route
        self.sweep(now)
        target = self.targets.get(name)
        if target is None:
            target = self._make_adhoc(name, now)
        route = Route(name, [target], self._deadline_s, RETRIES)
        self.routes[name] = route
        return route

    def configure(
        self, deadline_s: float, limit: int, idle_s: float, configured: Iterable[str]
    ) -> None:
        """A reload's settings; each name in ``configured`` is the config's now, not ad hoc."""
        self._deadline_s = deadline_s
        self.adhoc.limit = limit
        self.adhoc.idle_s = idle_s
        for name in configured:
            if name in self.adhoc:
                self.adhoc.discard(name)
                route = self.routes.get(name)
                if route is not None and route.chain and route.chain[0].name == name:
                    del self.routes[name]  # its one-target route: the config's chains hold it

    def used(self, route: Route, now: float) -> None:
        """A request on ``route`` began or ended at ``now``."""
        if route.name in self.adhoc:
            self.adhoc.touch(route.name, now)

    def sweep(self, now: float) -> None:
        """Drop the ad-hoc targets that no request used for server.adhoc_idle_s."""
        for name in self.adhoc.expired(now, self._busy):
            self._drop(name, "idle")

    def _make_adhoc(self, name: str, now: float) -> Target:
        target = self._make_target(name) if self._make_target is not None else None
        if target is None:
            known = ", ".join(sorted(n for n in self.routes if n not in self.adhoc)) or "none"
            raise Refused(
                "unknown_route",
                f"unknown route {name!r}: known routes are {known}, "
                "or name a target as provider/model",
            )
        if len(self.adhoc) >= self.adhoc.limit:
            victim = self.adhoc.evictable(self._busy)
            if victim is None:
                # "unavailable", not "bad_request": the name is fine, and the same request
                # succeeds once the requests on another ad-hoc target end.
                limit = self.adhoc.limit
                raise Refused(
                    "unavailable",
                    f"cannot route to {name!r}: each of the {limit} ad-hoc provider/model "
                    f"targets allowed at once (server.max_adhoc_targets = {limit}) has "
                    "requests in flight; retry later, name a configured route, or raise "
                    "server.max_adhoc_targets",
                    retry_after=RETRY_S,
                )
            self._drop(victim, "evicted")
        self.targets[name] = target
        self.adhoc.touch(name, now)
        return target

    def _busy(self, name: str) -> bool:
        route = self.routes.get(name)
        return route is not None and route.active > 0

    def _drop(self, name: str, reason: str) -> None:
        """Forget an ad-hoc target everywhere: route, target (and its breaker), metrics."""
        self.adhoc.discard(name)
        route = self.routes.pop(name, None)
        if route is not None and self.targets.get(name) is route.chain[0]:
            # Only its own: a reloaded config that names the target has built one of its own.
            del self.targets[name]
        self._on_drop(name)
        log.debug("adhoc_target_dropped", target=name, reason=reason)

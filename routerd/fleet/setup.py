"""Wiring the shared state into a daemon: the link, its hooks on the dispatcher, its metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from routerd.config.schema import StateConfig
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fleet.link import FleetLink

if TYPE_CHECKING:
    from routerd.fleet.backend import SharedState

LEASE_GRACE_S = 5.0


def connect_fleet(
    config: StateConfig,
    password: str | None,
    dispatcher: Dispatcher,
    registry: CollectorRegistry,
    on_change: Callable[[], None],
    clock: Callable[[], float] = time.monotonic,
) -> FleetLink | None:
    """The link to the hosts sharing these keys when [state] names a server, else None.

    The returned link's ``shared.run`` must run under the daemon's root task group.
    """
    if config.backend != "redis":
        return None
    from routerd.fleet.backend import SharedState  # the Redis client: imported only here

    link = FleetLink(
        dispatcher.actors, lambda: dispatcher.targets, on_change=on_change, clock=clock
    )
    link.shared = SharedState(
        config,
        password,
        apply=link.apply,
        local_facts=link.local_facts,
        windows=link.windows,
        on_link=link.link_changed,
    )
    dispatcher.sharing = link
    registry.register(SharedStateCollector(link.shared))
    return link


class SharedStateCollector(Collector):
    """/metrics of the shared state: connected, errors, facts each way, lag."""

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        """Read the link's counters at scrape time."""
        stats = self._shared.stats
        yield GaugeMetricFamily(
            "routerd_shared_state_connected",
            "1 while the shared state server (Redis/Valkey) is connected, else 0",
            value=1.0 if stats.connected else 0.0,
        )
        yield CounterMetricFamily(
            "routerd_shared_state_errors",
            "Errors talking to the shared state server (each broke the link or a claim)",
            value=stats.errors,
        )
        yield CounterMetricFamily(
            "routerd_shared_state_reconnects",
            "Times the link came back after an outage",
            value=stats.reconnects,
        )
        facts = CounterMetricFamily(
            "routerd_shared_state_facts",
            "Facts shared with the other hosts, by direction",
            labels=["direction"],
        )
        facts.add_metric(["published"], stats.published)
        facts.add_metric(["received"], stats.received)
        facts.add_metric(["dropped"], stats.dropped)
        yield facts
        yield GaugeMetricFamily(
            "routerd_shared_state_lag_seconds",
            "From another host learning a fact to this host applying it (the last one)",
            value=stats.lag_s or 0.0,
        )
        yield GaugeMetricFamily(
            "routerd_shared_state_lag_max_seconds",
            "The longest such lag seen since start",
            value=stats.lag_max_s,
        )

"""Prometheus metrics: request counts and upstream latency as they happen, pool state at scrape.

The counters are fed by the dispatcher's observer, so they count requests from both fronts
(msgpack and HTTP). The gauges are read from the same StatusReport `routerd status` shows,
at scrape time, so they cannot drift from it. The registry is the daemon's own, never
prometheus_client's global one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from routerd_client.protocol import StatusReport

from routerd.core.breaker import BreakerState
from routerd.core.credential import Health

CONTENT_TYPE = CONTENT_TYPE_LATEST

# LLM calls take from tens of milliseconds (a cached short answer) to minutes (long output).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _PoolCollector:
    """Gauges of credential, breaker and queue state, built from one snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], StatusReport]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        report = self._snapshot()
        state = GaugeMetricFamily(
            "routerd_credential_state",
            "1 for the credential's current state (ready, cooling, parked, disabled), else 0",
            labels=["provider", "credential", "state"],
        )
        cooldown = GaugeMetricFamily(
            "routerd_credential_cooldown_seconds",
            "Seconds until the credential is usable again (0 when ready)",
            labels=["provider", "credential"],
        )
        for credential in report.credentials:
            for health in Health:
                value = 1.0 if credential.state == health.value else 0.0
                state.add_metric([credential.provider, credential.label, health.value], value)
            cooldown.add_metric(
                [credential.provider, credential.label], credential.cooldown_left or 0.0
            )
        breaker = GaugeMetricFamily(
            "routerd_breaker_state",
            "1 for the target breaker's current state (closed, suspect, open, half_open), else 0",
            labels=["target", "state"],
        )
        for target in report.targets:
            for position in BreakerState:
                value = 1.0 if target.breaker == position.value else 0.0
                breaker.add_metric([target.target, position.value], value)
        queue = GaugeMetricFamily(
            "routerd_queue_depth",
            "Requests waiting for capacity on the route",
            labels=["route"],
        )
        for route in report.routes:
            queue.add_metric([route.name], float(route.waiting))
        in_flight = GaugeMetricFamily(
            "routerd_in_flight", "Requests in the dispatcher now, from both fronts"
        )
        in_flight.add_metric([], float(report.in_flight))
        return [state, cooldown, breaker, queue, in_flight, *_affinity(report)]


def _affinity(report: StatusReport) -> list[Metric]:
    """Conversations held per credential, and where conversations' turns went and why."""
    sessions = GaugeMetricFamily(
        "routerd_credential_sessions",
        "Conversations whose last turn the credential served (their prompt cache is there)",
        labels=["provider", "credential"],
    )
    for credential in report.credentials:
        sessions.add_metric([credential.provider, credential.label], float(credential.sessions))
    turns = CounterMetricFamily(
        "routerd_affinity_turns",
        "Conversation turns by placement: sticky (the last turn's key), group (a key of its "
        "cache group), new, or moved (the reason says why)",
        labels=["outcome", "reason"],
    )
    for name, count in report.affinity.turns.items():
        outcome, _, reason = name.partition(":")
        turns.add_metric([outcome, reason], float(count))
    return [sessions, turns]


class Metrics:
    """The daemon's metrics; ``observe`` is the dispatcher's observer callback."""

    def __init__(self, snapshot: Callable[[], StatusReport]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "routerd_requests",
            "Requests finished by the dispatcher, from both fronts, by outcome "
            "(ok or the failure class)",
            ["route", "target", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "routerd_upstream_latency_seconds",
            "Latency of the upstream call that settled each request (its last attempt), by target",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(snapshot))
        # The request series of each route and target name, so a dropped ad-hoc target's
        # series go with it (prometheus_client removes a child only by its exact labels).
        self._series: dict[str, set[tuple[str, str, str]]] = {}
        # Each series' child, looked up once: prometheus_client's labels() locks and hashes
        # on every call, on the path of every request.
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[str, Any] = {}

    def observe(self, route: str, target: str | None, outcome: str, latency_s: float) -> None:
        """Count one finished request; ``target`` is None when no upstream call was made."""
        labels = (route, target or "", outcome)
        counter = self._counted.get(labels)
        if counter is None:
            counter = self._counted[labels] = self.requests.labels(*labels)
            self._series.setdefault(route, set()).add(labels)
            if target is not None:
                self._series.setdefault(target, set()).add(labels)
        counter.inc()
        if target is not None:
            timer = self._timed.get(target)
            if timer is None:
                timer = self._timed[target] = self.latency.labels(target)
            timer.observe(latency_s)

    def forget(self, name: str) -> None:
        """Drop every series labelled with route or target ``name`` (an ad-hoc target gone)."""
        for labels in self._series.pop(name, set()):
            self._counted.pop(labels, None)
            with contextlib.suppress(KeyError):
                self.requests.remove(*labels)
        self._timed.pop(name, None)
        with contextlib.suppress(KeyError):
            self.latency.remove(name)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

"""Pool health: the StatusReport the daemon builds, and the table `routerd status` prints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from routerd_client.protocol import (
    AffinityStatus,
    CredentialStatus,
    LaneStatus,
    RouteStatus,
    SharedStateStatus,
    StatusReport,
    TargetStatus,
)

from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.dispatcher import Dispatcher

if TYPE_CHECKING:  # the Redis client is imported only when [state] uses it
    from routerd.fleet.backend import SharedState


def _left(until: float, now: float) -> float | None:
    return round(until - now, 3) if until > now else None


def credential_status(actor: CredentialActor, now: float, sessions: int = 0) -> CredentialStatus:
    """One credential's row: label and fingerprint, never the key."""
    state = actor.state
    health = state.current_health(now)
    lanes = [
        LaneStatus(
            name="requests",
            limit=state.requests.limit,
            remaining=state.requests.left(now),
            reset_in=_left(state.requests.reset_at, now),
        ),
        LaneStatus(
            name="tokens",
            limit=state.tokens.limit,
            remaining=state.tokens.left(now),
            reset_in=_left(state.tokens.reset_at, now),
        ),
        LaneStatus(name="long_context", cooling_for=_left(state.long_lane_until, now)),
    ]
    return CredentialStatus(
        provider=state.provider,
        label=state.label,
        fingerprint=state.fingerprint,
        state=health.value,
        cooldown_left=_left(state.until, now) if health.value != "ready" else None,
        reason=state.reason or None,
        remaining_requests=state.requests.left(now),
        remaining_tokens=state.tokens.left(now),
        in_flight=state.in_flight,
        successes=state.successes,
        failures=state.failures,
        latency_ms=None if state.latency_ms is None else round(state.latency_ms, 2),
        mailbox=actor.mailbox_depth,
        lanes=lanes,
        sessions=sessions,
    )


def build_report(
    request_id: int,
    dispatcher: Dispatcher,
    now: float,
    *,
    version: str,
    uptime_s: float,
    connections: int,
    shared: SharedState | None = None,
) -> StatusReport:
    """The StatusReport: the same data as `routerd status --json`."""
    # Ad-hoc targets that expired leave the report (and /metrics) now, not at the next request.
    dispatcher.sweep(now)
    targets = [
        TargetStatus(
            target=t.name,
            breaker=t.breaker.position(now).value,
            open_for=_left(t.breaker.until, now)
            if t.breaker.position(now).value == "open"
            else None,
            successes=t.breaker.successes,
            failures=t.breaker.failures,
            consecutive_failures=t.breaker.consecutive_failures,
            latency_ms=None if t.breaker.latency_ms is None else round(t.breaker.latency_ms, 2),
        )
        for t in dispatcher.targets.values()
    ]
    routes = [
        RouteStatus(name=r.name, chain=[t.name for t in r.chain], waiting=len(r.queue))
        for r in dispatcher.routes.values()
    ]
    held = dispatcher.affinity.per_credential(now)
    credentials = [
        credential_status(actor, now, held.get(key, 0)) for key, actor in dispatcher.actors.items()
    ]
    turns = {
        f"{outcome}:{reason}" if reason else outcome: count
        for (outcome, reason), count in sorted(dispatcher.affinity.outcomes.items())
    }
    return StatusReport(
        id=request_id,
        version=version,
        uptime_s=round(uptime_s, 1),
        connections=connections,
        in_flight=dispatcher.in_flight,
        credentials=credentials,
        targets=targets,
        routes=routes,
        shared_state=None if shared is None else shared_status(shared),
        affinity=AffinityStatus(sessions=sum(held.values()), turns=turns),
    )


def shared_status(shared: SharedState) -> SharedStateStatus:
    """The shared state's row: backend, server (no password: the config holds none) and link."""
    stats = shared.stats
    return SharedStateStatus(
        backend="redis",
        url=shared.url,
        connected=stats.connected,
        errors=stats.errors,
        lag_ms=None if stats.lag_s is None else round(stats.lag_s * 1000, 2),
    )


def _fmt(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    rows = list(rows)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line.rstrip()]
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return out


def render(report: StatusReport) -> str:
    """The human table: targets, then credentials, then routes."""
    lines = [
        f"routerd {report.version}  up {report.uptime_s:.0f}s  "
        f"connections {report.connections}  in flight {report.in_flight}",
        "",
    ]
    if (shared := report.shared_state) is not None:
        link = "connected" if shared.connected else "DISCONNECTED (serving on local state)"
        lines += [
            f"shared state: {shared.backend} {shared.url}  {link}  errors {shared.errors}",
            "",
        ]
    lines += _table(
        ["TARGET", "BREAKER", "OPEN FOR", "OK", "FAILED", "LATENCY"],
        (
            [
                t.target,
                t.breaker,
                _fmt(t.open_for, "s"),
                str(t.successes),
                str(t.failures),
                _fmt(t.latency_ms, "ms"),
            ]
            for t in report.targets
        ),
    )
    lines.append("")
    lines += _credential_table(report.credentials)
    lines.append("")
    lines += _table(
        ["ROUTE", "WAITING", "CHAIN"],
        ([r.name, str(r.waiting), " > ".join(r.chain)] for r in report.routes),
    )
    if report.affinity.sessions or report.affinity.turns:
        turns = ", ".join(f"{name} {count}" for name, count in report.affinity.turns.items())
        lines += ["", f"conversations held: {report.affinity.sessions}; turns: {turns or '-'}"]
    return "\n".join(lines)


def _credential_table(credentials: Iterable[CredentialStatus]) -> list[str]:
    """One row per credential: its state, what its provider reports left, and its record."""
    return _table(
        [
            "CREDENTIAL",
            "FINGERPRINT",
            "STATE",
            "COOLDOWN",
            "REQ LEFT",
            "TOK LEFT",
            "LONG LANE",
            "IN FLIGHT",
            "OK",
            "FAILED",
            "LATENCY",
            "SESSIONS",
            "REASON",
        ],
        (
            [
                f"{c.provider}/{c.label}",
                c.fingerprint,
                c.state,
                _fmt(c.cooldown_left, "s"),
                _fmt(c.remaining_requests),
                _fmt(c.remaining_tokens),
                _long_lane(c),
                str(c.in_flight),
                str(c.successes),
                str(c.failures),
                _fmt(c.latency_ms, "ms"),
                str(c.sessions),
                c.reason or "",
            ]
            for c in credentials
        ),
    )


def _long_lane(credential: CredentialStatus) -> str:
    for lane in credential.lanes:
        if lane.name == "long_context" and lane.cooling_for is not None:
            return f"cooling {lane.cooling_for:.1f}s"
    return "open"

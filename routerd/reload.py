"""Config reload (SIGHUP, `routerd reload`): what a new config keeps, adds and drops.

Pure functions over the running daemon's objects, so the rules are tested without a
daemon: a credential with the same provider, label and key fingerprint keeps its whole
state (cooldowns, parks, learned windows, counters) and takes the new limits; one whose
key changed, or that is new, starts fresh; one the config no longer names is dropped.
Targets keep their breakers and learned token scale and take the new provider and model
settings. Listener settings cannot change under a running daemon and are named, so the
operator knows a restart is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from routerd.build import build_chain, build_target, pools_of
from routerd.config.schema import Config, ServerConfig
from routerd.config.secrets import Secret
from routerd.core.credential import CredentialState, LocalLimit
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.routes import Route

Key = tuple[str, str]

# [server] keys read once at start: sockets are bound and listeners built with them.
RESTART_KEYS = (
    "socket",
    "socket_mode",
    "state_file",
    "http_socket",
    "http_listen",
    "http_token_env",
    "http_allow_remote",
    "max_frame",
    "max_connections",
    "http_keepalive_s",
    "buffer_budget",
    "mailbox_size",
    "responses_max",
    "responses_max_bytes",
    "responses_ttl_s",
    "affinity_sessions",
    "affinity_idle_s",
)


@dataclass(slots=True)
class CredentialPlan:
    """The credential actors after a reload, and which of them changed."""

    actors: dict[Key, CredentialActor]
    kept: list[Key] = field(default_factory=list)
    added: list[CredentialActor] = field(default_factory=list)
    removed: list[CredentialActor] = field(default_factory=list)


def plan_credentials(
    current: Mapping[Key, CredentialActor],
    secrets: list[Secret],
    config: Config,
    make_actor: Callable[[Secret, int], CredentialActor],
) -> CredentialPlan:
    """Match the new secrets against the running actors (by provider, label, fingerprint)."""
    result = CredentialPlan(actors={})
    for order, secret in enumerate(secrets):
        key = (secret.provider, secret.label)
        actor = current.get(key)
        if actor is not None and actor.state.fingerprint == secret.fingerprint:
            _retune(actor, secret, config, order)
            result.kept.append(key)
        else:
            if actor is not None:
                result.removed.append(actor)  # the same label with another key: a new key
            actor = make_actor(secret, order)
            result.added.append(actor)
        result.actors[key] = actor
    result.removed += [a for k, a in current.items() if k not in result.actors]
    return result


def _retune(actor: CredentialActor, secret: Secret, config: Config, order: int) -> None:
    """Give a kept credential the new config's limits; its learned state stays."""
    state = actor.state
    provider = config.providers[secret.provider]
    actor.secret = secret
    state.order = order
    state.max_concurrent = secret.max_concurrent
    state.quota_park_s = provider.quota_park_s
    state.auth_probe_s = provider.auth_probe_s
    state.cache_group = secret.cache_group
    state.long_context = secret.long_context
    state.rpm = _limit(state.rpm, secret.rpm)
    state.tpm = _limit(state.tpm, secret.tpm)


def _limit(current: LocalLimit | None, limit: int | None) -> LocalLimit | None:
    """The same window with a new ceiling, so what was spent in it still counts."""
    if limit is None:
        return None
    if current is None:
        return LocalLimit(limit)
    current.limit = limit
    return current


def retarget(target: Target, fresh: Target) -> None:
    """Update a running target in place from one built from the new config.

    Its breaker state, learned token scale and (shared, in-place updated) pool stay.
    """
    target.kind = fresh.kind
    target.strategy = fresh.strategy
    target.context_window = fresh.context_window
    target.long_context_window = fresh.long_context_window
    target.long_context_headers = fresh.long_context_headers
    breaker, new = target.breaker, fresh.breaker
    breaker.failure_threshold = new.failure_threshold
    breaker.open_s = new.open_s
    breaker.max_open_s = new.max_open_s


def repool(pools: dict[str, list[CredentialState]], actors: Mapping[Key, CredentialActor]) -> None:
    """Give each provider's pool the new actors' states, in place: targets (ad-hoc ones
    included) hold these very lists."""
    fresh = pools_of(actors)
    for provider in {*pools, *fresh}:
        pools.setdefault(provider, [])[:] = fresh.get(provider, [])


def reroute(
    routes: dict[str, Route],
    targets: dict[str, Target],
    pools: Mapping[str, list[CredentialState]],
    old: Config,
    config: Config,
) -> None:
    """Targets take the new settings (keeping breakers); routes take the new chains."""
    for name, target in list(targets.items()):
        fresh = build_target(name, config, pools)
        if fresh is not None:
            retarget(target, fresh)
    named = {t for route in config.routes.values() for t in route.chain}
    for name in old.routes:
        if name not in config.routes:
            # Requests already on it finish with its old chain; new ones get unknown_route.
            routes.pop(name, None)
    for name, route_config in config.routes.items():
        chain = build_chain(name, config, targets, pools)
        route = routes.get(name)
        if route is None:
            routes[name] = Route(name, chain, route_config.deadline_s, route_config.retries)
        else:
            route.chain[:] = chain
            route.deadline_s = route_config.deadline_s
            route.retries = route_config.retries
    for name in [n for n in targets if n not in named and n not in routes]:
        # A target only the old config named: its breaker leaves status and the state file.
        del targets[name]


def restart_needed(old: ServerConfig, new: ServerConfig) -> list[str]:
    """The [server] keys that changed but take effect only when routerd restarts."""
    return [f"server.{k}" for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]


@dataclass(frozen=True, slots=True)
class ReloadSummary:
    """What a reload did, for the log and for `routerd reload`."""

    kept: int
    added: list[str]
    removed: list[str]
    routes: int
    restart_needed: list[str]

    def describe(self) -> str:
        """One line for the operator."""
        parts = [f"{self.kept} credential(s) kept with their state"]
        if self.added:
            parts.append(f"started fresh: {', '.join(self.added)}")
        if self.removed:
            parts.append(f"dropped: {', '.join(self.removed)}")
        parts.append(f"{self.routes} route(s)")
        if self.restart_needed:
            parts.append(f"needs a restart to apply: {', '.join(self.restart_needed)}")
        return "; ".join(parts)

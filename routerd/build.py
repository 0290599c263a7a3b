"""Building the daemon's runtime objects from a config: credential states, targets, providers.

One builder for start-up, for ad-hoc provider/model targets and for reload, so a target
made any of those ways carries the same context windows, long-context headers and breaker
settings.
"""

from __future__ import annotations

from collections.abc import Mapping

from routerd.config.schema import Config, ServerConfig, split_target
from routerd.config.secrets import Secret
from routerd.core.breaker import Breaker
from routerd.core.credential import CredentialState, LocalLimit
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.attempt import ProviderRuntime
from routerd.dispatch.routes import Route
from routerd.fdlimit import shares, soft_limit
from routerd.upstream.registry import adapter_for
from routerd.upstream.session import UpstreamSession

# Well-known context windows, used where the config names none.
KNOWN_WINDOWS: dict[str, int] = {
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude-sonnet-4-5": 200_000,
    "claude-opus-4-1": 200_000,
    "claude-haiku-4-5": 200_000,
    "llama-3.3-70b-versatile": 131_072,
    "meta-llama/llama-3.3-70b-instruct": 131_072,
    "gemini-2.5-pro": 1_048_576,
    "gemini-2.5-flash": 1_048_576,
}

# What a request must carry to use a model's long-context window, per API kind.
LONG_CONTEXT_HEADERS: dict[str, dict[str, str]] = {
    "anthropic": {"anthropic-beta": "context-1m-2025-08-07"},
}


def credential_state(secret: Secret, config: Config, order: int) -> CredentialState:
    """A fresh state for one credential, with the limits its config gives it."""
    provider = config.providers[secret.provider]
    return CredentialState(
        provider=secret.provider,
        label=secret.label,
        fingerprint=secret.fingerprint,
        order=order,
        max_concurrent=secret.max_concurrent,
        rpm=LocalLimit(secret.rpm) if secret.rpm else None,
        tpm=LocalLimit(secret.tpm) if secret.tpm else None,
        quota_park_s=provider.quota_park_s,
        auth_probe_s=provider.auth_probe_s,
        cache_group=secret.cache_group,
        long_context=secret.long_context,
    )


def build_target(
    name: str, config: Config, pools: Mapping[str, list[CredentialState]]
) -> Target | None:
    """The target "provider/model" as ``config`` describes it; None for an unknown provider.

    The target shares its provider's pool list, which a reload updates in place.
    """
    try:
        provider, model = split_target(name)
    except ValueError:
        return None
    provider_config = config.providers.get(provider)
    if provider_config is None:
        return None
    model_config = config.models.get(name)
    breaker = config.breaker
    context_window = model_config.context_window if model_config else None
    return Target(
        name=name,
        provider=provider,
        model=model,
        kind=provider_config.kind,
        strategy=provider_config.strategy,
        breaker=Breaker(name, breaker.failure_threshold, breaker.open_s, breaker.max_open_s),
        pool=pools.get(provider, []),
        context_window=context_window or KNOWN_WINDOWS.get(model),
        long_context_window=model_config.long_context_window if model_config else None,
        long_context_headers=LONG_CONTEXT_HEADERS.get(provider_config.kind, {}),
    )


def provider_runtimes(config: Config, http: UpstreamSession) -> dict[str, ProviderRuntime]:
    """What each provider's attempts need besides credentials: adapter, URL, timeout."""
    return {
        name: ProviderRuntime(
            name=name,
            adapter=adapter_for(p.kind, http),
            base_url=p.base_url,
            timeout_s=p.timeout_s,
            headers=dict(p.headers),
            connect_timeout_s=p.connect_timeout_s,
        )
        for name, p in config.providers.items()
    }


def pools_of(actors: Mapping[tuple[str, str], CredentialActor]) -> dict[str, list[CredentialState]]:
    """Each provider's credential states, in the actors' order: the pool its targets share."""
    pools: dict[str, list[CredentialState]] = {}
    for (provider, _), actor in actors.items():
        pools.setdefault(provider, []).append(actor.state)
    return pools


def build_chain(
    route_name: str,
    config: Config,
    targets: dict[str, Target],
    pools: Mapping[str, list[CredentialState]],
) -> list[Target]:
    """A configured route's targets, built once (into ``targets``) and shared by every chain
    naming them."""
    chain: list[Target] = []
    for name in config.routes[route_name].chain:
        target = targets.get(name) or build_target(name, config, pools)
        if target is None:  # load_config rejects this; a Config built in code may not
            raise ValueError(f"route {route_name!r}: no provider for target {name!r}")
        targets[name] = target
        chain.append(target)
    return chain


def build_routes(
    config: Config, targets: dict[str, Target], pools: Mapping[str, list[CredentialState]]
) -> dict[str, Route]:
    """Every configured route, its targets built into ``targets``."""
    return {
        name: Route(
            name, build_chain(name, config, targets, pools), route.deadline_s, route.retries
        )
        for name, route in config.routes.items()
    }


def connection_caps(server: ServerConfig) -> tuple[int, int]:
    """How many connections each listener may hold, and the upstream pool: they share the
    descriptor limit."""
    # http_listen counts twice: "localhost" binds an IPv4 and an IPv6 socket.
    listeners = 1 + (server.http_socket is not None) + 2 * (server.http_listen is not None)
    return shares(soft_limit(), listeners=listeners, configured=server.max_connections)


def default_deadline(config: Config) -> float:
    """The deadline of a request on an ad-hoc target: the longest any route allows."""
    return max((r.deadline_s for r in config.routes.values()), default=120.0)

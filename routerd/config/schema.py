"""The config file's schema: one msgspec Struct per table, with its defaults."""

from __future__ import annotations

from typing import Literal

import msgspec

Strategy = Literal["headroom", "fill_first", "round_robin", "least_used", "random"]
ProviderKind = Literal["openai", "anthropic", "openai-compatible"]


class CredentialConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One API key: where its secret comes from and its own limits.

    Exactly one of key_env, key_file, key_credential (a systemd credential name, read from
    $CREDENTIALS_DIRECTORY) names the secret.
    """

    label: str
    key_env: str | None = None
    key_file: str | None = None
    key_credential: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    # Keys of one organisation (one prompt cache): conversations may move among them.
    cache_group: str | None = None
    # False: this key has no long-context tier; long requests never try it.
    long_context: bool = True


class ProviderConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One provider: its API kind, where it lives, and the pool of keys that serve it."""

    kind: ProviderKind
    base_url: str
    strategy: Strategy = "headroom"
    credentials: list[CredentialConfig] = msgspec.field(default_factory=list)
    pool_env: str | None = None
    pool_rpm: int | None = None
    pool_tpm: int | None = None
    pool_max_concurrent: int | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    quota_park_s: float = 3600.0
    auth_probe_s: float = 3600.0


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-target facts: the context window, and the long-context window where one exists."""

    context_window: int | None = None
    long_context_window: int | None = None


class RouteConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An ordered fallback chain of "provider/model" targets.

    ``retries`` bounds the attempts that are not key switches (a key switch after a 429,
    a quota or an auth failure never uses it up).
    """

    chain: list[str]
    deadline_s: float = 120.0
    retries: int = 2


class BreakerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """When a target's breaker opens, and how long it stays open before a half-open probe."""

    failure_threshold: int = 3
    open_s: float = 5.0
    max_open_s: float = 120.0


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where the daemon listens and keeps its state. Empty paths mean the defaults."""

    socket: str | None = None
    socket_mode: int = 0o660
    state_file: str | None = None
    http_socket: str | None = None
    http_listen: str | None = None
    http_token_env: str = "ROUTERD_HTTP_TOKEN"
    # http_listen must be a loopback address unless this is set: the front holds every key.
    http_allow_remote: bool = False
    # Who may use the sockets beyond their file mode (user and group names or ids); empty:
    # whoever can open the socket. The daemon's own user is always allowed.
    allowed_users: list[str] = msgspec.field(default_factory=list)
    allowed_groups: list[str] = msgspec.field(default_factory=list)
    max_frame: int = 16 * 1024 * 1024
    mailbox_size: int = 256
    drain_timeout_s: float = 30.0
    state_flush_s: float = 1.0
    log_level: str = "info"
    # Open connections per listening socket (msgpack, HTTP Unix, HTTP TCP); the daemon also
    # keeps each cap below what its file-descriptor limit allows.
    max_connections: int = 1000
    # A frame, HTTP request head or body that has begun must arrive whole within this.
    read_timeout_s: float = 30.0
    # An idle HTTP keep-alive connection is closed after this.
    http_keepalive_s: float = 5.0
    # Bytes that all incomplete frames and request bodies may hold together.
    buffer_budget: int = 64 * 1024 * 1024
    # provider/model targets named by requests rather than by a route: how many may exist at
    # once, and how long an unused one is kept.
    max_adhoc_targets: int = 256
    adhoc_idle_s: float = 600.0
    # The Responses API's answered turns, kept for previous_response_id and GET: how many,
    # how many bytes in all, and for how long (0 responses: nothing is kept).
    responses_max: int = 10_000
    responses_max_bytes: int = 64 * 1024 * 1024
    responses_ttl_s: float = 7 * 86400.0
    # Conversation affinity: how many conversations are kept on their credentials, and how
    # long one is held without a turn (0 conversations: no affinity).
    affinity_sessions: int = 10_000
    affinity_idle_s: float = 3600.0
    # The event loop: uvloop when it is installed ("auto"), or always ("uvloop": an error
    # when missing), or asyncio's own.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"


class StateConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where credential and breaker state is shared: the state file alone (the default), or
    a Redis / Valkey server that several hosts using the same keys share.

    The password comes from password_env or password_file (at most one), never the config.
    """

    backend: Literal["file", "redis"] = "file"
    url: str | None = None
    prefix: str = "routerd"
    password_env: str | None = None
    password_file: str | None = None
    # Each command to the server: a slower answer counts as the server being down.
    timeout_s: float = 1.0


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole config file."""

    providers: dict[str, ProviderConfig]
    routes: dict[str, RouteConfig]
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    models: dict[str, ModelConfig] = msgspec.field(default_factory=dict)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)


def split_target(target: str) -> tuple[str, str]:
    """Split "provider/model" at the first "/" (model names may contain "/" themselves).

    Raises ValueError when either half is missing.
    """
    provider, sep, model = target.partition("/")
    if not sep or not provider or not model:
        raise ValueError(f"{target!r} is not of the form 'provider/model'")
    return provider, model

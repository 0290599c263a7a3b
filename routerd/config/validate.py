"""The checks a schema-valid config must pass, each problem named with its key and line."""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import pwd
import re
from urllib.parse import urlsplit

from routerd import eventloop
from routerd.config.problems import (
    ConfigProblem,
    ProblemList,
)
from routerd.config.schema import (
    BreakerConfig,
    Config,
    CredentialConfig,
    ModelConfig,
    ProviderConfig,
    RouteConfig,
    ServerConfig,
    StateConfig,
    split_target,
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes of real provider keys (OpenAI, Anthropic, OpenRouter, Groq, Gemini, xAI): a value
# that starts like this was pasted where the *name* of a variable or file belongs.
_KEY_PREFIXES = ("sk-", "sk_", "gsk_", "AIza", "xai-")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_AUTH_HEADERS = {"authorization", "proxy-authorization", "x-api-key", "api-key"}


def looks_like_key(value: str) -> bool:
    """True when a name field starts the way a provider's API key does."""
    return value.startswith(_KEY_PREFIXES)


def env_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an environment variable's name, or None if it can.

    The message never repeats ``name``: a bad one is often the key itself.
    """
    # Variable names are short and mostly upper case; a long mix of lower case and digits
    # is a key even when its provider's prefix is not one we know.
    random_looking = (
        len(name) >= 32 and any(c.islower() for c in name) and any(c.isdigit() for c in name)
    )
    if looks_like_key(name) or random_looking:
        return "looks like an API key; give the NAME of the environment variable that holds it"
    if not _ENV_NAME.fullmatch(name):
        return "must be an environment variable name (letters, digits and _)"
    return None


def validate_config(
    config: Config, *, source: str = "<config>", text: str | None = None
) -> list[ConfigProblem]:
    """Every semantic problem in a schema-valid config (empty when it can be used).

    ``text``, when given, is the TOML the config came from and lets problems name lines.
    """
    problems = ProblemList(source, text)
    if not config.providers:
        problems.add(("providers",), "no providers are defined")
    for name, provider in config.providers.items():
        _check_provider(problems, name, provider)
    for key, model in config.models.items():
        _check_model(problems, config, key, model)
    if not config.routes:
        problems.add(("routes",), "no routes are defined")
    for name, route in config.routes.items():
        _check_route(problems, config, name, route)
    _check_server(problems, config.server)
    _check_breaker(problems, config.breaker)
    _check_state(problems, config.state)
    return problems.problems


def _positive(problems: ProblemList, path: tuple[str | int, ...], value: float | None) -> None:
    # NaN and infinity are valid TOML floats, and neither is a usable limit or timeout.
    if value is not None and not (math.isfinite(value) and value > 0):
        problems.add(path, f"must be greater than 0, got {value!r}")


def _check_provider(problems: ProblemList, name: str, provider: ProviderConfig) -> None:
    here = ("providers", name)
    if not name or "/" in name:
        problems.add(here, "a provider name must be non-empty and contain no '/'")
    url = urlsplit(provider.base_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        problems.add((*here, "base_url"), "must start with http:// or https:// and name a host")
    if not provider.credentials and provider.pool_env is None:
        problems.add(here, "needs at least one credential (credentials = [...]) or a pool_env")
    labels: dict[str, int] = {}
    for i, cred in enumerate(provider.credentials):
        at = (*here, "credentials", i)
        if not cred.label.strip():
            problems.add((*at, "label"), "must not be empty")
        elif cred.label in labels:
            problems.add(
                (*at, "label"),
                f"label '{cred.label}' is already used by credentials[{labels[cred.label]}]",
            )
        else:
            labels[cred.label] = i
        _check_key_source(problems, at, cred)
        for field in ("rpm", "tpm", "max_concurrent"):
            _positive(problems, (*at, field), getattr(cred, field))
    if provider.pool_env is not None and (message := env_name_problem(provider.pool_env)):
        problems.add((*here, "pool_env"), message)
    for field in ("pool_rpm", "pool_tpm", "pool_max_concurrent"):
        value = getattr(provider, field)
        _positive(problems, (*here, field), value)
        if value is not None and provider.pool_env is None:
            problems.add((*here, field), "has no effect without pool_env")
    for field in ("timeout_s", "connect_timeout_s", "quota_park_s", "auth_probe_s"):
        _positive(problems, (*here, field), getattr(provider, field))
    for header in provider.headers:
        if header.lower() in _AUTH_HEADERS:
            problems.add(
                (*here, "headers", header),
                "keys do not go in headers; the adapter sends each credential's key itself",
            )


def _check_key_source(
    problems: ProblemList, at: tuple[str | int, ...], cred: CredentialConfig
) -> None:
    sources = {
        "key_env": cred.key_env,
        "key_file": cred.key_file,
        "key_credential": cred.key_credential,
    }
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        found = f"got {' and '.join(given)}" if given else "got none"
        problems.add(at, f"needs exactly one of key_env, key_file, key_credential ({found})")
    if cred.key_env is not None and (message := env_name_problem(cred.key_env)):
        problems.add((*at, "key_env"), message)
    if cred.key_file is not None and not os.path.isabs(cred.key_file):
        # Relative paths would depend on the working directory, which is / under systemd.
        problems.add((*at, "key_file"), "must be the absolute path of a file that holds the key")
    name = cred.key_credential
    if name is not None and (
        not name or "/" in name or name in (".", "..") or looks_like_key(name)
    ):
        problems.add(
            (*at, "key_credential"),
            "must be the name of a systemd credential (LoadCredential=NAME:PATH), not a path",
        )


def _check_model(problems: ProblemList, config: Config, key: str, model: ModelConfig) -> None:
    here = ("models", key)
    try:
        provider, _ = split_target(key)
    except ValueError:
        problems.add(here, 'model keys are written "provider/model"')
    else:
        if provider not in config.providers:
            problems.add(here, f"provider '{provider}' is not defined in [providers]")
    _positive(problems, (*here, "context_window"), model.context_window)
    _positive(problems, (*here, "long_context_window"), model.long_context_window)
    ctx, long = model.context_window, model.long_context_window
    if ctx is not None and long is not None and 0 < long <= ctx:
        problems.add(
            (*here, "long_context_window"),
            f"must be larger than context_window ({ctx}), got {long}",
        )


def _check_route(problems: ProblemList, config: Config, name: str, route: RouteConfig) -> None:
    here = ("routes", name)
    if not route.chain:
        problems.add((*here, "chain"), 'must name at least one "provider/model" target')
    for i, target in enumerate(route.chain):
        try:
            provider, _ = split_target(target)
        except ValueError as exc:
            problems.add((*here, "chain", i), str(exc))
            continue
        if provider not in config.providers:
            known = ", ".join(config.providers) or "none"
            problems.add(
                (*here, "chain", i),
                f"provider '{provider}' is not defined in [providers] (defined: {known})",
            )
    _positive(problems, (*here, "deadline_s"), route.deadline_s)
    if route.retries < 0:
        problems.add((*here, "retries"), f"must be 0 or more, got {route.retries}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _check_server(problems: ProblemList, server: ServerConfig) -> None:
    here = ("server",)
    listen = server.http_listen
    if listen is not None and (message := _listen_problem(listen, server.http_allow_remote)):
        problems.add((*here, "http_listen"), message)
    if message := env_name_problem(server.http_token_env):
        problems.add((*here, "http_token_env"), message)
    if not 1024 <= server.max_frame <= 1 << 30:
        problems.add(
            (*here, "max_frame"),
            f"must be between 1 KiB and 1 GiB in bytes, got {server.max_frame}",
        )
    if not 0 <= server.socket_mode <= 0o777:
        problems.add((*here, "socket_mode"), "must be a permission mode such as 0o660")
    if server.mailbox_size < 1:
        problems.add((*here, "mailbox_size"), f"must be 1 or more, got {server.mailbox_size}")
    _positive(problems, (*here, "state_flush_s"), server.state_flush_s)
    if not (math.isfinite(server.drain_timeout_s) and server.drain_timeout_s >= 0):
        problems.add((*here, "drain_timeout_s"), "must be 0 or more seconds")
    for field in ("max_connections", "max_adhoc_targets"):
        if getattr(server, field) < 1:
            problems.add((*here, field), f"must be 1 or more, got {getattr(server, field)}")
    for field in (
        "read_timeout_s",
        "http_keepalive_s",
        "adhoc_idle_s",
        "responses_ttl_s",
        "affinity_idle_s",
    ):
        _positive(problems, (*here, field), getattr(server, field))
    for field in ("responses_max", "responses_max_bytes", "affinity_sessions"):
        if getattr(server, field) < 0:
            problems.add((*here, field), f"must be 0 or more, got {getattr(server, field)}")
    if server.buffer_budget < server.max_frame:
        problems.add(
            (*here, "buffer_budget"),
            f"must be at least max_frame ({server.max_frame} bytes), got {server.buffer_budget}",
        )
    for index, name in enumerate(server.allowed_users):
        if not name.isdigit() and not _user_exists(name):
            problems.add((*here, "allowed_users", index), f"no user named {name!r} here")
    for index, name in enumerate(server.allowed_groups):
        if not name.isdigit() and not _group_exists(name):
            problems.add((*here, "allowed_groups", index), f"no group named {name!r} here")
    if server.event_loop == "uvloop" and not eventloop.uvloop_installed():
        problems.add(
            (*here, "event_loop"),
            'uvloop is not installed here: install it (pip install uvloop) or use "auto"',
        )
    if server.log_level.lower() not in _LOG_LEVELS:
        problems.add(
            (*here, "log_level"),
            f"expected one of {', '.join(_LOG_LEVELS)}; got {server.log_level!r}",
        )


def _listen_problem(listen: str, allow_remote: bool) -> str | None:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return f"expected host:port such as 127.0.0.1:8484, got {listen!r}"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return "write an IPv6 address in brackets, such as [::1]:8484"
    if allow_remote:
        return None
    if host.lower() == "localhost":
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return (
            f"host {host or '(all interfaces)'!r} is not a loopback address; the HTTP front "
            "holds every key, so it listens on 127.0.0.1, ::1 or localhost unless "
            "server.http_allow_remote = true"
        )
    return None


def _check_breaker(problems: ProblemList, breaker: BreakerConfig) -> None:
    here = ("breaker",)
    if breaker.failure_threshold < 1:
        problems.add(
            (*here, "failure_threshold"), f"must be 1 or more, got {breaker.failure_threshold}"
        )
    _positive(problems, (*here, "open_s"), breaker.open_s)
    _positive(problems, (*here, "max_open_s"), breaker.max_open_s)
    if breaker.max_open_s < breaker.open_s:
        problems.add((*here, "max_open_s"), f"must be at least open_s ({breaker.open_s})")


_REDIS_SCHEMES = ("redis", "rediss", "unix")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _check_state(problems: ProblemList, state: StateConfig) -> None:
    here = ("state",)
    if state.backend == "file":
        for field in ("url", "password_env", "password_file"):
            if getattr(state, field) is not None:
                problems.add((*here, field), 'has no effect unless backend = "redis"')
        return
    if state.url is None:
        problems.add(here, 'backend = "redis" needs url, such as "redis://127.0.0.1:6379/0"')
    elif message := _redis_url_problem(state.url):
        problems.add((*here, "url"), message)
    if not _PREFIX.fullmatch(state.prefix):
        problems.add((*here, "prefix"), "must be 1-64 letters, digits or _ . : -")
    if state.password_env is not None and state.password_file is not None:
        problems.add(here, "give at most one of password_env, password_file")
    if state.password_env is not None and (message := env_name_problem(state.password_env)):
        problems.add((*here, "password_env"), message)
    if state.password_file is not None and not os.path.isabs(state.password_file):
        problems.add((*here, "password_file"), "must be the absolute path of a file")
    _positive(problems, (*here, "timeout_s"), state.timeout_s)


def _redis_url_problem(url: str) -> str | None:
    """Why ``url`` names no Redis server; the message never repeats a password in it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a URL; expected redis://host:port/db, rediss://... or unix:///path"
    if parts.scheme not in _REDIS_SCHEMES:
        return "must start with redis://, rediss:// or unix://"
    if parts.password:
        return "must not hold a password; use password_env or password_file"
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        return "unix:// needs the absolute path of the socket, such as unix:///run/redis.sock"
    if parts.scheme != "unix" and not parts.hostname:
        return "must name a host, such as redis://127.0.0.1:6379/0"
    return None

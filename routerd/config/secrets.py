"""Provider keys: reading them from the environment, files and systemd credentials.

A key leaves this module only inside a Secret, whose repr and str show a fingerprint in
its place; no problem message, exception or log line built here ever contains a key.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from routerd.config.problems import ProblemList
from routerd.config.schema import Config, CredentialConfig, ProviderConfig
from routerd.config.tomlpos import KeyPath
from routerd.config.validate import env_name_problem, looks_like_key

__all__ = ["Secret", "fingerprint", "resolve_secrets", "resolve_state_password"]

# Far above any real API key; a bigger file is the wrong file, and is not read whole.
_MAX_KEY_BYTES = 64 * 1024
_POOL_SPLIT = re.compile(r"[,\n]")
_POOL_LABEL = re.compile(r"[A-Za-z0-9_.:@-]+")
_CREDENTIALS_HINT = "key_credential needs systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)"


def fingerprint(key: str) -> str:
    """A stable, non-reversible name for a key: "sha256:" and 12 hex digits of its hash."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Secret:
    """One resolved credential: who it belongs to, its key, and its own limits."""

    provider: str
    label: str
    key: str = field(repr=False)
    fingerprint: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    cache_group: str | None = None
    long_context: bool = True

    def __repr__(self) -> str:
        return (
            f"Secret(provider={self.provider!r}, label={self.label!r}, "
            f"fingerprint={self.fingerprint!r}, rpm={self.rpm!r}, tpm={self.tpm!r}, "
            f"max_concurrent={self.max_concurrent!r})"
        )

    def __str__(self) -> str:
        return f"{self.provider}/{self.label} ({self.fingerprint})"


class _Missing(Exception):
    """A key could not be read; the message says why and never contains the key."""


def resolve_secrets(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
    source: str = "<config>",
    text: str | None = None,
) -> list[Secret]:
    """Read every provider key the config names; raises one ConfigError listing all failures.

    ``environ`` defaults to the process environment; ``credentials_dir`` to its
    $CREDENTIALS_DIRECTORY. ``source`` and ``text`` (the config's TOML) let problems name
    the file and line of the key they are about.
    """
    env = os.environ if environ is None else environ
    cred_dir = credentials_dir if credentials_dir is not None else env.get("CREDENTIALS_DIRECTORY")
    problems = ProblemList(source, text)
    secrets: list[Secret] = []
    for name, provider in config.providers.items():
        secrets.extend(_resolve_provider(name, provider, env, cred_dir, problems))
    problems.raise_if_any()
    return secrets


def resolve_state_password(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<config>",
    text: str | None = None,
) -> str | None:
    """The shared state server's password from [state] password_env or password_file.

    None when neither is set (or the backend is the state file). Raises ConfigError naming
    the key and its line when the password cannot be read; the message never holds it.
    """
    state = config.state
    if state.backend != "redis":
        return None
    env = os.environ if environ is None else environ
    problems = ProblemList(source, text)
    password: str | None = None
    try:
        if state.password_env is not None:
            where: KeyPath = ("state", "password_env")
            if message := env_name_problem(state.password_env):
                raise _Missing(where, message)
            password = env.get(state.password_env, "").strip()
            if not password:
                raise _Missing(where, f"environment variable {state.password_env} is not set")
        elif state.password_file is not None:
            where = ("state", "password_file")
            what = f"password file {state.password_file}"
            password = _read_key_file(where, state.password_file, what)
    except _Missing as exc:
        problems.add(exc.args[0], exc.args[1])
    problems.raise_if_any()
    return password


def _resolve_provider(
    name: str,
    provider: ProviderConfig,
    env: Mapping[str, str],
    cred_dir: str | None,
    problems: ProblemList,
) -> list[Secret]:
    found: list[tuple[KeyPath, Secret]] = []
    for i, cred in enumerate(provider.credentials):
        path: KeyPath = ("providers", name, "credentials", i)
        try:
            where, key = _read_credential(path, cred, env, cred_dir)
        except _Missing as exc:
            problems.add(exc.args[0], exc.args[1])
            continue
        if message := _key_problem(key):
            problems.add(where, message)
            continue
        secret = Secret(
            name,
            cred.label,
            key,
            fingerprint(key),
            cred.rpm,
            cred.tpm,
            cred.max_concurrent,
            cred.cache_group,
            cred.long_context,
        )
        found.append((path, secret))
    if provider.pool_env is not None:
        found.extend(_resolve_pool(name, provider, provider.pool_env, env, problems))
    return _without_duplicates(found, problems)


def _read_credential(
    path: KeyPath, cred: CredentialConfig, env: Mapping[str, str], cred_dir: str | None
) -> tuple[KeyPath, str]:
    """The key a credential names, with the path of the field that named it."""
    if cred.key_env is not None:
        where: KeyPath = (*path, "key_env")
        if message := env_name_problem(cred.key_env):
            raise _Missing(where, message)
        value = env.get(cred.key_env, "").strip()
        if not value:
            raise _Missing(where, f"environment variable {cred.key_env} is not set")
        return where, value
    if cred.key_file is not None:
        where = (*path, "key_file")
        if looks_like_key(cred.key_file):
            raise _Missing(where, "must be the path of a file that holds the key")
        return where, _read_key_file(where, cred.key_file, f"key file {cred.key_file}")
    if cred.key_credential is not None:
        where = (*path, "key_credential")
        name = cred.key_credential
        if not cred_dir:
            raise _Missing(where, _CREDENTIALS_HINT)
        if not os.path.isdir(cred_dir):
            raise _Missing(where, f"$CREDENTIALS_DIRECTORY {cred_dir} is not a directory")
        if looks_like_key(name) or "/" in name or name in ("", ".", ".."):
            raise _Missing(where, "must be the name of a systemd credential")
        file_path = os.path.join(cred_dir, name)
        if not os.path.exists(file_path):
            raise _Missing(
                where,
                f"systemd credential {name!r} is not in $CREDENTIALS_DIRECTORY ({cred_dir}); "
                f"add LoadCredential={name}:/path/to/key to the unit",
            )
        return where, _read_key_file(where, file_path, f"systemd credential file {file_path}")
    raise _Missing(path, "names no key: set one of key_env, key_file, key_credential")


def _read_key_file(where: KeyPath, file_path: str, what: str) -> str:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever, and
    # `serve` and `check` with it. Only a regular file is read.
    try:
        fd = os.open(file_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Missing(where, f"{what} does not exist") from None
    except IsADirectoryError:
        raise _Missing(where, f"{what} is a directory") from None
    except OSError as exc:
        raise _Missing(where, f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _Missing(where, f"{what} is a directory")
        if not stat.S_ISREG(mode):
            raise _Missing(where, f"{what} is not a regular file (a FIFO, socket or device)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise _Missing(where, f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_BYTES:
        raise _Missing(where, f"{what} is too large to hold a key")
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Missing(where, f"{what} is not text") from None
    if not key:
        raise _Missing(where, f"{what} is empty")
    return key


def _key_problem(key: str) -> str | None:
    # A key goes into an HTTP header: whitespace inside usually means two keys in one place.
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        return "the key contains whitespace or non-printable characters (more than one key?)"
    return None


def _resolve_pool(
    name: str,
    provider: ProviderConfig,
    pool_env: str,
    env: Mapping[str, str],
    problems: ProblemList,
) -> list[tuple[KeyPath, Secret]]:
    where: KeyPath = ("providers", name, "pool_env")
    if message := env_name_problem(pool_env):
        problems.add(where, message)
        return []
    entries = [e.strip() for e in _POOL_SPLIT.split(env.get(pool_env, ""))]
    entries = [e for e in entries if e]
    if not entries:
        problems.add(where, f"environment variable {pool_env} is not set")
        return []
    found: list[tuple[KeyPath, Secret]] = []
    for n, entry in enumerate(entries, start=1):
        label, key = _split_pool_entry(entry)
        if label is not None and not key:
            problems.add(where, f"entry {n} of {pool_env} has a label but no key")
            continue
        if message := _key_problem(key):
            problems.add(where, f"entry {n} of {pool_env}: {message}")
            continue
        secret = Secret(
            name,
            label or f"{pool_env.lower()}-{n}",
            key,
            fingerprint(key),
            provider.pool_rpm,
            provider.pool_tpm,
            provider.pool_max_concurrent,
        )
        found.append((where, secret))
    return found


def _split_pool_entry(entry: str) -> tuple[str | None, str]:
    """Split "label=KEY"; an entry without a label-like word before "=" is a bare key.

    A key part starting with "=" means the "=" belonged to the key (base64 padding).
    """
    label, sep, key = entry.partition("=")
    label, key = label.strip(), key.strip()
    if sep and _POOL_LABEL.fullmatch(label) and not key.startswith("="):
        return label, key
    return None, entry


def _without_duplicates(
    found: Sequence[tuple[KeyPath, Secret]], problems: ProblemList
) -> list[Secret]:
    by_label: dict[str, Secret] = {}
    by_key: dict[str, Secret] = {}
    kept: list[Secret] = []
    for where, secret in found:
        if secret.label in by_label:
            problems.add(where, f"credential label {secret.label!r} is used twice")
            continue
        if (first := by_key.get(secret.key)) is not None:
            problems.add(
                where,
                f"credential {secret.label!r} has the same key as {first.label!r} "
                f"({secret.fingerprint})",
            )
            continue
        by_label[secret.label] = by_key[secret.key] = secret
        kept.append(secret)
    return kept

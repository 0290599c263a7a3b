"""Loading the config file: read, parse, check; every error names the key and the line.

A config that loads can be trusted inside the daemon.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence

import msgspec

from routerd.config.problems import (
    ConfigError,
    ConfigProblem,
    ProblemList,
    schema_problems,
    syntax_problem,
)
from routerd.config.schema import Config
from routerd.config.secrets import Secret, resolve_secrets, resolve_state_password
from routerd.config.validate import validate_config


def read_config_text(path: str | os.PathLike[str]) -> str:
    """Read a config file as text; any failure is a ConfigError naming the path."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        message = "config file not found"
    except IsADirectoryError:
        message = "is a directory, not a config file"
    except OSError as exc:
        message = f"cannot read config file: {exc.strerror or exc}"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"config file is not UTF-8 text (bad byte at offset {exc.start})"
    raise ConfigError([ConfigProblem(source, None, "", message)])


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and check the config file at ``path``; raises ConfigError."""
    return parse_config(read_config_text(path), source=os.fspath(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and check a config text; raises ConfigError naming each bad key and its line.

    A TOML syntax error stops at the first one; schema errors are all reported, and the
    semantic checks run once the schema holds, reporting every problem at once.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([syntax_problem(exc, text, source)]) from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError:
        raise ConfigError(schema_problems(raw, Config, source, text)) from None
    problems = validate_config(config, source=source, text=text)
    if problems:
        raise ConfigError(problems)
    return config


def check_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    credentials_dir: str | None = None,
    secrets: bool = True,
) -> list[ConfigProblem]:
    """Every problem with the config at ``path`` and the keys it names (empty: it is valid).

    Secrets are read from the real environment unless ``environ`` is given; what
    ``routerd check`` prints. ``secrets=False`` checks the file alone (a build machine has
    no keys): no key, password or token is looked for.
    """
    source = os.fspath(path)
    try:
        text = read_config_text(path)
        config = parse_config(text, source=source)
    except ConfigError as exc:
        return exc.problems
    if not secrets:
        return []
    env = os.environ if environ is None else environ
    problems = ProblemList(source, text)
    try:
        resolve_secrets(
            config, environ=env, credentials_dir=credentials_dir, source=source, text=text
        )
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        resolve_state_password(config, environ=env, source=source, text=text)
    except ConfigError as exc:
        problems.extend(exc.problems)
    server = config.server
    if server.http_listen is not None and not env.get(server.http_token_env, "").strip():
        problems.add(
            ("server", "http_token_env"),
            f"http_listen needs a token: environment variable {server.http_token_env} is not set",
        )
    return problems.problems


def summarize(config: Config, secrets: Sequence[Secret]) -> str:
    """What `routerd check` says about a valid config: "2 providers, 5 credentials, 1 route".

    The CLI prints it as "config.toml: ok (...)".
    """

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

    return ", ".join(
        [
            count(len(config.providers), "provider"),
            count(len(secrets), "credential"),
            count(len(config.routes), "route"),
        ]
    )

"""Provider keys: resolved from env, files, systemd credentials and pools; never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from routerd.config.load import check_config, parse_config, summarize
from routerd.config.problems import ConfigError, ConfigProblem
from routerd.config.secrets import Secret, fingerprint, resolve_secrets
from routerd.core.calls import Call
from tests.test_config import BASE, CANARY, line_of, problems_of

# --- secrets ------------------------------------------------------------------------------


def test_secrets_from_env_file_credentials_dir_and_pool(tmp_path: Path) -> None:
    key_file = tmp_path / "ci.key"
    key_file.write_text("  sk-file-key  \n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "anthropic-team").write_text("sk-ant-cred\n")
    text = (
        BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{key_file}"')
        .replace('key_env = "ANTHROPIC_API_KEY"', 'key_credential = "anthropic-team"')
        .replace(
            'kind = "openai"',
            'kind = "openai"\npool_env = "OPENAI_API_KEYS"\npool_rpm = 60\npool_max_concurrent = 2',
        )
    )
    environ = {"OPENAI_API_KEY": "sk-env-key", "OPENAI_API_KEYS": "sk-p1, night=sk-p2\nsk-p3=="}
    secrets = resolve_secrets(
        parse_config(text), environ=environ, credentials_dir=str(creds), text=text
    )
    got = [(s.provider, s.label, s.key, s.rpm, s.max_concurrent) for s in secrets]
    assert got == [
        ("openai", "main", "sk-env-key", None, None),
        ("openai", "ci", "sk-file-key", 500, None),
        ("openai", "openai_api_keys-1", "sk-p1", 60, 2),
        ("openai", "night", "sk-p2", 60, 2),
        ("openai", "openai_api_keys-3", "sk-p3==", 60, 2),
        ("anthropic", "team", "sk-ant-cred", None, None),
    ]
    assert secrets[0].fingerprint == fingerprint("sk-env-key")
    assert fingerprint("sk-env-key").startswith("sha256:")
    assert len(fingerprint("sk-env-key")) == len("sha256:") + 12


def test_credentials_directory_comes_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "team").write_text("sk-ant-from-systemd")
    text = BASE.replace('key_env = "ANTHROPIC_API_KEY"', 'key_credential = "team"')
    environ = {"OPENAI_API_KEY": "a", "OPENAI_CI_KEY": "b", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    secrets = resolve_secrets(parse_config(text), environ=environ)
    assert secrets[-1].key == "sk-ant-from-systemd"


def test_every_missing_secret_is_reported_with_its_key_and_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("\n  \n")
    text = (
        BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{tmp_path / "absent.key"}"')
        .replace('key_env = "ANTHROPIC_API_KEY"', 'key_credential = "team"')
        .replace('base_url = "https://api.anthropic.com"', 'base_url = "https://x"\npool_env = "P"')
        .replace(
            '[{ label = "team"', f'[{{ label = "e", key_file = "{empty}" }}, {{ label = "team"'
        )
    )
    with pytest.raises(ConfigError) as info:
        resolve_secrets(
            parse_config(text), environ={"OPENAI_API_KEY": ""}, source="config.toml", text=text
        )
    lines = str(info.value).splitlines()
    assert lines == [
        f"config.toml:{line_of(text, 'OPENAI_API_KEY')}: "
        "providers.openai.credentials[0].key_env: environment variable OPENAI_API_KEY is not set",
        f"config.toml:{line_of(text, 'absent.key')}: providers.openai.credentials[1].key_file: "
        f"key file {tmp_path / 'absent.key'} does not exist",
        f"config.toml:{line_of(text, 'pool_env')}: providers.anthropic.pool_env: "
        "environment variable P is not set",
        f"config.toml:{line_of(text, 'empty.key')}: providers.anthropic.credentials[0].key_file: "
        f"key file {empty} is empty",
        f"config.toml:{line_of(text, 'key_credential')}: "
        "providers.anthropic.credentials[1].key_credential: "
        "key_credential needs systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)",
    ]


def test_missing_systemd_credential_says_how_to_load_it(tmp_path: Path) -> None:
    text = BASE.replace('key_env = "ANTHROPIC_API_KEY"', 'key_credential = "team"')
    environ = {"OPENAI_API_KEY": "a", "OPENAI_CI_KEY": "b"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(text), environ=environ, credentials_dir=str(tmp_path))
    assert "LoadCredential=team:" in str(info.value)


def test_unreadable_key_file_is_named(tmp_path: Path) -> None:
    environ = {"OPENAI_API_KEY": "a", "ANTHROPIC_API_KEY": "b"}
    text = BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{tmp_path}"')
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(text), environ=environ)
    assert str(info.value).endswith(f"key file {tmp_path} is a directory")
    if os.geteuid() != 0:  # root reads any file whatever its mode
        locked = tmp_path / "locked.key"
        locked.write_text(CANARY)
        locked.chmod(0)
        text = BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{locked}"')
        with pytest.raises(ConfigError) as info:
            resolve_secrets(parse_config(text), environ=environ)
        assert f"cannot read key file {locked}: Permission denied" in str(info.value)
        assert CANARY not in str(info.value)


def test_a_fifo_key_file_is_refused_at_once(tmp_path: Path) -> None:
    # Opening a FIFO with no writer used to block serve and check forever.
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    environ = {"OPENAI_API_KEY": "a", "ANTHROPIC_API_KEY": "b"}
    text = BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{fifo}"')
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(text), environ=environ)
    assert str(info.value).endswith(
        f"key file {fifo} is not a regular file (a FIFO, socket or device)"
    )


def test_a_fifo_key_file_does_not_hang_routerd_check(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    config = tmp_path / "config.toml"
    config.write_text(BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{fifo}"'))
    env = {**os.environ, "OPENAI_API_KEY": "a", "ANTHROPIC_API_KEY": "b"}
    done = subprocess.run(
        [sys.executable, "-m", "routerd", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 1
    assert "is not a regular file" in done.stdout


def test_pool_label_clash_and_label_without_key_are_problems() -> None:
    text = BASE.replace('kind = "openai"', 'kind = "openai"\npool_env = "POOL"')
    environ = {"OPENAI_API_KEY": "a", "OPENAI_CI_KEY": "b", "ANTHROPIC_API_KEY": "c"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(text), environ={**environ, "POOL": "main=sk-x,spare="})
    messages = [p.message for p in info.value.problems]
    assert messages == [
        "entry 2 of POOL has a label but no key",
        "credential label 'main' is used twice",
    ]


# --- keys never leak ----------------------------------------------------------------------


def test_secret_repr_and_str_show_the_fingerprint_not_the_key() -> None:
    secret = Secret("openai", "main", CANARY, fingerprint(CANARY), rpm=5)
    shown = [repr(secret), str(secret), f"{secret}", repr([secret]), repr({"s": secret})]
    for text in shown:
        assert CANARY not in text
        assert CANARY[3:20] not in text
    assert fingerprint(CANARY) in repr(secret)
    assert str(secret) == f"openai/main ({fingerprint(CANARY)})"


def test_call_repr_shows_the_call_not_its_key() -> None:
    # The Call an adapter sends carries the key itself: a traceback's locals, a log of the
    # call or an f-string of it must still never show it.
    call = Call("http://127.0.0.1:9/v1", "gpt-x", CANARY, {"messages": []}, 30.0)
    shown = [repr(call), str(call), f"{call}", repr([call]), repr({"c": call})]
    for text in shown:
        assert CANARY not in text
        assert CANARY[3:20] not in text
    assert repr(call) == (
        "Call(base_url='http://127.0.0.1:9/v1', model='gpt-x', body={'messages': []}, "
        "timeout=30.0, headers={}, connect_timeout=5.0)"
    )
    assert call.key == CANARY


def test_canary_key_never_appears_in_any_problem(tmp_path: Path) -> None:
    key_file = tmp_path / "dup.key"
    key_file.write_text(CANARY)
    two_keys = tmp_path / "two.key"
    two_keys.write_text(f"{CANARY}\n{CANARY}x\n")
    text = (
        BASE.replace('key_env = "OPENAI_CI_KEY"', f'key_file = "{key_file}"')
        .replace('key_env = "ANTHROPIC_API_KEY"', f'key_file = "{two_keys}"')
        .replace('kind = "anthropic"', 'kind = "anthropic"\npool_env = "POOL"')
    )
    environ = {"OPENAI_API_KEY": CANARY, "POOL": f"a={CANARY} b, {CANARY}\t,{CANARY}"}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(parse_config(text), environ=environ, source="config.toml", text=text)
    error = info.value
    messages = [p.message for p in error.problems]
    assert messages == [
        f"credential 'ci' has the same key as 'main' ({fingerprint(CANARY)})",
        "entry 1 of POOL: the key contains whitespace or non-printable characters (more than "
        "one key?)",
        f"credential 'pool-3' has the same key as 'pool-2' ({fingerprint(CANARY)})",
        "the key contains whitespace or non-printable characters (more than one key?)",
    ]
    for shown in (str(error), repr(error), repr(error.problems), *map(str, error.problems)):
        assert CANARY not in shown
        assert CANARY[3:20] not in shown


def test_canary_pasted_in_place_of_names_is_not_echoed() -> None:
    for old, new in [
        ('key_env = "OPENAI_API_KEY"', f'key_env = "{CANARY}"'),
        ('key_env = "OPENAI_API_KEY"', f'key_credential = "{CANARY}"'),
        ('key_env = "OPENAI_API_KEY"', f'key_file = "{CANARY}"'),
        ("rpm = 500", f'rpm = "{CANARY}"'),
        ('kind = "openai"', f'kind = "openai"\npool_env = "{CANARY}"'),
    ]:
        error_text = "\n".join(str(p) for p in problems_of(BASE.replace(old, new)))
        assert error_text
        assert CANARY not in error_text


# --- check_config and summarize ---------------------------------------------------------


def test_check_config_collects_parse_and_secret_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE)
    environ = {"OPENAI_API_KEY": "a", "OPENAI_CI_KEY": "b", "ANTHROPIC_API_KEY": "c"}
    assert check_config(path, environ=environ) == []

    problems = check_config(path, environ={"OPENAI_API_KEY": "a"})
    assert [p.key for p in problems] == [
        "providers.openai.credentials[1].key_env",
        "providers.anthropic.credentials[0].key_env",
    ]
    assert all(str(p).startswith(f"{path}:") for p in problems)

    path.write_text(BASE.replace("[server]\n", '[server]\nhttp_listen = "127.0.0.1:8484"\n'))
    problems = check_config(path, environ=environ)
    assert [p.key for p in problems] == ["server.http_token_env"]
    assert "ROUTERD_HTTP_TOKEN is not set" in problems[0].message

    path.write_text("[routes\n")
    assert [p.line for p in check_config(path, environ=environ)] == [1]
    assert check_config(tmp_path / "missing.toml") == [
        ConfigProblem(str(tmp_path / "missing.toml"), None, "", "config file not found")
    ]


def test_summarize_counts_providers_credentials_and_routes() -> None:
    config = parse_config(BASE)
    environ = {"OPENAI_API_KEY": "a", "OPENAI_CI_KEY": "b", "ANTHROPIC_API_KEY": "c"}
    assert summarize(config, resolve_secrets(config, environ=environ)) == (
        "2 providers, 3 credentials, 1 route"
    )

"""The [state] section: a shared state server for several hosts, checked like the rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from routerd.config.load import check_config, parse_config
from routerd.config.problems import ConfigError
from routerd.config.secrets import resolve_state_password
from tests.test_config import BASE, line_of, only_problem

PASSWORD = "redis-canary-9f86d081884c7d659a2feaa0c55ad015"


def test_without_a_state_section_the_file_backend_is_the_default() -> None:
    config = parse_config(BASE, source="config.toml")
    assert config.state.backend == "file"
    assert resolve_state_password(config, environ={}) is None


def test_a_redis_backend_takes_its_url_prefix_and_password_env() -> None:
    text = BASE + (
        '\n[state]\nbackend = "redis"\nurl = "unix:///run/redis/redis.sock"\n'
        'prefix = "team-a"\npassword_env = "ROUTERD_REDIS_PASSWORD"\n'
    )
    config = parse_config(text, source="config.toml")
    assert (config.state.url, config.state.prefix) == ("unix:///run/redis/redis.sock", "team-a")
    password = resolve_state_password(config, environ={"ROUTERD_REDIS_PASSWORD": PASSWORD})
    assert password == PASSWORD


@pytest.mark.parametrize(
    ("body", "key", "fragment", "message"),
    [
        ('backend = "redis"', "state", "[state]", "needs url"),
        ('backend = "redis"\nurl = "http://x:6379"', "state.url", "x:6379", "redis://"),
        ('backend = "redis"\nurl = "redis://:hunter2@x:6379"', "state.url", "@x:6379", "password"),
        (
            'backend = "redis"\nurl = "unix://relative.sock"',
            "state.url",
            "relative.sock",
            "absolute",
        ),
        (
            'backend = "redis"\nurl = "redis://x"\nprefix = "a b"',
            "state.prefix",
            "prefix",
            "letters",
        ),
        ('url = "redis://x"', "state.url", "redis://x", 'backend = "redis"'),
        (
            'backend = "redis"\nurl = "redis://x"\npassword_file = "p"',
            "state.password_file",
            "password_file",
            "absolute",
        ),
        (
            'backend = "redis"\nurl = "redis://x"\ntimeout_s = 0',
            "state.timeout_s",
            "timeout_s",
            "greater than 0",
        ),
    ],
)
def test_a_bad_state_section_names_the_key_and_line(
    body: str, key: str, fragment: str, message: str
) -> None:
    text = BASE + "\n[state]\n" + body + "\n"
    problem = only_problem(text)
    assert problem.key == key
    assert message in problem.message
    assert problem.line == line_of(text, fragment)
    assert "hunter2" not in str(problem)


def test_a_password_pasted_into_password_env_is_refused_without_repeating_it() -> None:
    text = BASE + f'\n[state]\nbackend = "redis"\nurl = "redis://x"\npassword_env = "{PASSWORD}"\n'
    problem = only_problem(text)
    assert problem.key == "state.password_env"
    assert PASSWORD not in str(problem)


def test_a_password_env_that_is_not_set_is_named_with_its_line(tmp_path: Path) -> None:
    text = BASE + '\n[state]\nbackend = "redis"\nurl = "redis://x"\npassword_env = "NO_SUCH_PW"\n'
    config = parse_config(text, source="config.toml")
    with pytest.raises(ConfigError) as info:
        resolve_state_password(config, environ={}, source="config.toml", text=text)
    (problem,) = info.value.problems
    assert problem.key == "state.password_env"
    assert problem.line == line_of(text, "password_env")
    assert "NO_SUCH_PW is not set" in problem.message


def test_the_password_comes_from_a_file_and_check_reports_a_missing_one(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text(PASSWORD + "\n")
    text = BASE + f'\n[state]\nbackend = "redis"\nurl = "redis://x"\npassword_file = "{secret}"\n'
    config = parse_config(text, source="config.toml")
    assert resolve_state_password(config, environ={}) == PASSWORD
    secret.unlink()
    path = tmp_path / "config.toml"
    path.write_text(text)
    env = {"OPENAI_API_KEY": "k1", "OPENAI_CI_KEY": "k2", "ANTHROPIC_API_KEY": "k3"}
    problems = check_config(path, environ={**os.environ, **env})
    assert [(p.key, p.line) for p in problems] == [
        ("state.password_file", line_of(text, "password_file"))
    ]
    assert "does not exist" in problems[0].message

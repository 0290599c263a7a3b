"""Loading the config: every error names the key and the line where it is written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from routerd.config.load import check_config, load_config, parse_config
from routerd.config.problems import ConfigError, ConfigProblem
from routerd.config.schema import Config, split_target

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A key that must never show up in anything a user or a log can see.
CANARY = "sk-canary-5d41402abc4b2a76b9719d911017c592"

BASE = """\
[server]
socket = "/tmp/routerd-test.sock"

[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
credentials = [
  { label = "main", key_env = "OPENAI_API_KEY" },
  { label = "ci", key_env = "OPENAI_CI_KEY", rpm = 500 },
]

[providers.anthropic]
kind = "anthropic"
base_url = "https://api.anthropic.com"
credentials = [{ label = "team", key_env = "ANTHROPIC_API_KEY" }]

[models."anthropic/claude-sonnet-4-5"]
context_window = 200000
long_context_window = 1000000

[routes.default]
chain = ["anthropic/claude-sonnet-4-5", "openai/gpt-4.1"]
deadline_s = 120
"""


def line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    """The 1-based line of the n-th line containing ``fragment``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if fragment in line]
    return hits[occurrence - 1]


def problems_of(text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="config.toml")
    return info.value.problems


def only_problem(text: str) -> ConfigProblem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# --- a valid config -----------------------------------------------------------------------


def test_valid_config_parses_with_defaults() -> None:
    config = parse_config(BASE)
    assert isinstance(config, Config)
    assert [c.label for c in config.providers["openai"].credentials] == ["main", "ci"]
    assert config.providers["openai"].credentials[1].rpm == 500
    assert config.providers["openai"].strategy == "headroom"
    assert config.routes["default"].deadline_s == 120.0
    assert config.models["anthropic/claude-sonnet-4-5"].long_context_window == 1_000_000
    assert config.server.http_allow_remote is False


def test_split_target_splits_at_the_first_slash_only() -> None:
    assert split_target("openrouter/meta-llama/llama-3.3-70b") == (
        "openrouter",
        "meta-llama/llama-3.3-70b",
    )
    for bad in ("gpt-4.1", "/gpt-4.1", "openai/"):
        with pytest.raises(ValueError, match="provider/model"):
            split_target(bad)


# --- TOML syntax errors -------------------------------------------------------------------


def test_toml_syntax_error_names_its_line() -> None:
    text = BASE.replace("deadline_s = 120", "deadline_s = = 120")
    problem = only_problem(text)
    assert problem.line == line_of(text, "deadline_s")
    assert str(problem).startswith(f"config.toml:{problem.line}: TOML syntax error: ")
    assert "column" in problem.message


def test_unclosed_array_points_at_the_last_written_line() -> None:
    text = '[routes.default]\nchain = ["openai/gpt-4.1"\n\n\n'
    problem = only_problem(text)
    assert problem.line == 2
    assert "unclosed array" in problem.message


def test_table_declared_twice_is_named_like_the_file_writes_it() -> None:
    text = BASE + '\n[models."anthropic/claude-sonnet-4-5"]\ncontext_window = 1\n'
    problem = only_problem(text)
    assert problem.line == line_of(text, '[models."anthropic', occurrence=2)
    assert 'models."anthropic/claude-sonnet-4-5" twice' in problem.message


# --- schema errors: the key and the line where it is written --------------------------------


def test_bad_enum_value_lists_the_choices() -> None:
    text = BASE.replace('kind = "openai"', 'kind = "openai"\nstrategy = "fastest"')
    problem = only_problem(text)
    assert str(problem) == (
        f"config.toml:{line_of(text, 'strategy')}: providers.openai.strategy: expected one of "
        "headroom, fill_first, round_robin, least_used, random; got 'fastest'"
    )


def test_wrong_type_in_second_inline_credential_points_at_its_line() -> None:
    text = BASE.replace("rpm = 500", 'rpm = "500"')
    problem = only_problem(text)
    assert problem.key == "providers.openai.credentials[1].rpm"
    assert problem.line == line_of(text, 'label = "ci"')
    assert problem.message == "expected an integer, got '500'"


def test_unknown_key_suggests_the_right_one() -> None:
    text = BASE.replace('socket = "/tmp', 'sockte_mode = 0o600\nsocket = "/tmp')
    problem = only_problem(text)
    assert problem.key == "server.sockte_mode"
    assert problem.line == line_of(text, "sockte_mode")
    assert "did you mean 'socket_mode'?" in problem.message


def test_missing_required_key_points_at_its_table() -> None:
    text = BASE.replace('kind = "anthropic"\n', "")
    problem = only_problem(text)
    assert problem.key == "providers.anthropic.kind"
    assert problem.line == line_of(text, "[providers.anthropic]")
    assert "required key 'kind' is missing" in problem.message


def test_quoted_model_key_is_quoted_in_the_path() -> None:
    text = BASE.replace("context_window = 200000", 'context_window = "200k"')
    problem = only_problem(text)
    assert problem.key == 'models."anthropic/claude-sonnet-4-5".context_window'
    assert problem.line == line_of(text, 'context_window = "200k"')


def test_dotted_keys_and_array_tables_are_located() -> None:
    text = """\
[providers]
openai.kind = "openai"
openai.base_url = "https://api.openai.com/v1"

[[providers.openai.credentials]]
label = "main"
key_env = "OPENAI_API_KEY"

[[providers.openai.credentials]]
label = "ci"
key_env = "OPENAI_CI_KEY"
max_concurrent = "eight"

[routes.default]
chain = ["openai/gpt-4.1"]
"""
    problem = only_problem(text)
    assert problem.key == "providers.openai.credentials[1].max_concurrent"
    assert problem.line == line_of(text, "max_concurrent")

    # With a bad kind too, both are reported, each at its own line.
    dotted = text.replace('openai.kind = "openai"', 'openai.kind = "azure"')
    kind, count = problems_of(dotted)
    assert (kind.key, kind.line) == ("providers.openai.kind", 2)
    assert (count.key, count.line) == (problem.key, problem.line)


def test_secret_pasted_into_config_is_refused_without_echoing_it() -> None:
    text = BASE.replace('{ label = "main", ', f'{{ label = "main", api_key = "{CANARY}", ')
    problem = only_problem(text)
    assert problem.key == "providers.openai.credentials[0].api_key"
    assert problem.line == line_of(text, "api_key")
    assert "key_env, key_file or key_credential" in problem.message
    assert CANARY not in str(problem)


# --- semantic checks ----------------------------------------------------------------------


def test_every_semantic_problem_is_reported_at_once_in_file_order() -> None:
    text = """\
[server]
http_listen = "0.0.0.0:8484"
max_frame = 512

[providers.openai]
kind = "openai"
base_url = "api.openai.com/v1"
credentials = [
  { label = "main", key_env = "OPENAI_API_KEY", rpm = 0 },
  { label = "main", key_file = "/etc/k", key_env = "X" },
  { label = "spare" },
]

[providers.empty]
kind = "openai-compatible"
base_url = "http://127.0.0.1:8000/v1"

[models."nowhere/model"]
context_window = 1000
long_context_window = 1000

[routes.default]
chain = ["openai/gpt-4.1", "mistral/large", "gpt-4o"]
deadline_s = 0
retries = -1

[routes.empty]
chain = []
"""
    problems = problems_of(text)
    found = {(p.key, p.line) for p in problems}
    expected = {
        ("server.http_listen", 2),
        ("server.max_frame", 3),
        ("providers.openai.base_url", 7),
        ("providers.openai.credentials[0].rpm", 9),
        ("providers.openai.credentials[1].label", 10),
        ("providers.openai.credentials[1]", 10),
        ("providers.openai.credentials[2]", 11),
        ("providers.empty", 14),
        ('models."nowhere/model"', 18),
        ('models."nowhere/model".long_context_window', 20),
        ("routes.default.chain[1]", 23),
        ("routes.default.chain[2]", 23),
        ("routes.default.deadline_s", 24),
        ("routes.default.retries", 25),
        ("routes.empty.chain", 28),
    }
    assert found == expected
    assert [p.line for p in problems] == sorted(p.line or 0 for p in problems)
    by_key = {p.key: p.message for p in problems}
    assert "provider 'mistral' is not defined" in by_key["routes.default.chain[1]"]
    assert "already used by credentials[0]" in by_key["providers.openai.credentials[1].label"]
    assert "got key_env and key_file" in by_key["providers.openai.credentials[1]"]
    assert "got none" in by_key["providers.openai.credentials[2]"]
    assert "at least one credential" in by_key["providers.empty"]
    assert "1 KiB and 1 GiB" in by_key["server.max_frame"]
    # The exception's text is the list a user sees: one problem per line.
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="config.toml")
    assert str(info.value).splitlines() == [str(p) for p in problems]


@pytest.mark.parametrize(
    ("listen", "allow_remote", "ok"),
    [
        ("127.0.0.1:8484", False, True),
        ("127.8.9.10:80", False, True),
        ("[::1]:8484", False, True),
        ("localhost:8484", False, True),
        ("0.0.0.0:8484", False, False),
        ("192.168.1.5:8484", False, False),
        ("example.com:8484", False, False),
        (":8484", False, False),
        ("0.0.0.0:8484", True, True),
        ("127.0.0.1", False, False),
        ("127.0.0.1:99999", False, False),
        ("::1:8484", False, False),
    ],
)
def test_http_listen_must_be_loopback_unless_allowed(
    listen: str, allow_remote: bool, ok: bool
) -> None:
    server = (
        f'[server]\nhttp_listen = "{listen}"\nhttp_allow_remote = {str(allow_remote).lower()}\n'
    )
    text = BASE.replace('[server]\nsocket = "/tmp/routerd-test.sock"\n', server)
    if ok:
        assert parse_config(text).server.http_listen == listen
    else:
        problem = only_problem(text)
        assert (problem.key, problem.line) == ("server.http_listen", 2)


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ('key_env = "OPENAI_API_KEY"', f'key_env = "{CANARY}"', "key_env", "looks like an API key"),
        ('key_env = "OPENAI_API_KEY"', 'key_file = "keys/openai"', "key_file", "absolute path"),
        ('key_env = "OPENAI_API_KEY"', 'key_credential = "a/b"', "key_credential", "systemd"),
        ("rpm = 500", "rpm = 500, tpm = -1", "tpm", "greater than 0"),
        ("rpm = 500", "max_concurrent = 0", "max_concurrent", "greater than 0"),
    ],
)
def test_credential_field_problems(old: str, new: str, key: str, needle: str) -> None:
    text = BASE.replace(old, new)
    problem = only_problem(text)
    assert problem.key.startswith("providers.openai.credentials[")
    assert problem.key.endswith(key)
    assert problem.line == line_of(text, new)
    assert needle in problem.message
    assert CANARY not in str(problem)


def test_pool_limits_need_a_pool() -> None:
    text = BASE.replace('kind = "anthropic"', 'kind = "anthropic"\npool_rpm = 50')
    problem = only_problem(text)
    assert (problem.key, problem.line) == ("providers.anthropic.pool_rpm", line_of(text, "pool_"))
    assert "without pool_env" in problem.message


def test_auth_headers_are_refused() -> None:
    text = BASE.replace('kind = "anthropic"', 'kind = "anthropic"\nheaders = { x-api-key = "k" }')
    problem = only_problem(text)
    assert problem.key == "providers.anthropic.headers.x-api-key"
    assert problem.line == line_of(text, "headers")


def test_load_config_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: config file not found"


def test_load_config_reads_a_file_and_names_it_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE)
    assert load_config(path).routes["default"].chain[0] == "anthropic/claude-sonnet-4-5"
    path.write_text(BASE.replace("deadline_s = 120", "deadline_s = -1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{line_of(BASE, 'deadline_s')}: routes.default")


def test_config_error_survives_pickling() -> None:
    error = ConfigError([ConfigProblem("c.toml", 3, "routes", "bad")])
    again = pickle.loads(pickle.dumps(error))
    assert again.problems == error.problems
    assert str(again) == "c.toml:3: routes: bad"


# --- the examples -------------------------------------------------------------------------


def fake_environ(config: Config) -> dict[str, str]:
    """A value for every variable the config names, as a deployment would set them."""
    env = {config.server.http_token_env: "token"}
    for name, provider in config.providers.items():
        for cred in provider.credentials:
            if cred.key_env:
                env[cred.key_env] = f"sk-{name}-{cred.label}"
        if provider.pool_env:
            env[provider.pool_env] = f"sk-{name}-pool-1,spare=sk-{name}-pool-2"
    return env


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_is_a_valid_config(path: Path) -> None:
    config = load_config(path)
    assert config.routes
    for route in config.routes.values():
        for target in route.chain:
            assert split_target(target)[0] in config.providers
    # Only key files that live on a real deployment may be missing here.
    problems = check_config(path, environ=fake_environ(config))
    assert [p for p in problems if not p.key.endswith(".key_file")] == []


def test_the_expected_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*.toml")}
    assert {
        "openai.toml",
        "anthropic.toml",
        "openrouter.toml",
        "groq.toml",
        "local-vllm-ollama.toml",
        "multi-provider.toml",
    } <= names
    text = (EXAMPLES / "local-vllm-ollama.toml").read_text()
    config = parse_config(text)
    assert config.providers["vllm"].base_url == "http://127.0.0.1:8000/v1"
    assert config.providers["ollama"].base_url == "http://127.0.0.1:11434/v1"
    gemini = parse_config((EXAMPLES / "multi-provider.toml").read_text()).providers["gemini"]
    assert gemini.kind == "openai-compatible"
    assert gemini.base_url == "https://generativelanguage.googleapis.com/v1beta/openai"

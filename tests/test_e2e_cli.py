"""The `routerd` command as a user runs it: a subprocess, its exit code and what it prints.

`status` against the real daemon (and against none), `check` on good and bad configs, and
canary keys that must never show up in the daemon's log, its status or its state file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from routerd_client import AsyncClient, Client, RouterdError, TargetDown

from routerd import __version__, cli
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary
from tests.test_client import FakeDaemon

MockFactory = Callable[[MockSpec], MockProcess]


def routerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m routerd ARGS` and capture what it prints."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTERD_")}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "routerd", *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=30,
        check=False,
    )


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def assert_no_key(text: str, keys: list[str]) -> None:
    for key in keys:
        assert key not in text
        # The random part alone would be a leak too (a masked key keeps only 2 of its chars).
        assert key[-24:] not in text


def test_status_shows_credentials_and_breakers_but_no_key(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    key_a, key_b = canary("alpha"), canary("beta")
    mock = mock_provider(
        MockSpec(
            keys={key_a: KeySpec("alpha"), key_b: KeySpec("beta")},
            models={"dead": ModelSpec(fault="503"), "alive": ModelSpec()},
        )
    )
    config = f"""
[breaker]
failure_threshold = 1
open_s = 60
max_open_s = 60

[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "alpha", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "beta", key_env = "KEY_B" }}]

[routes.main]
chain = ["a/dead", "b/alive"]
"""
    daemon_process = daemon(config, env={"KEY_A": key_a, "KEY_B": key_b})
    socket_path = str(daemon_process.socket_path)
    with Client(socket_path) as client:
        assert client.chat("main", user("hi")).target == "b/alive"
        report = client.status()
    fingerprints = {c.label: c.fingerprint for c in report.credentials}

    table = routerd("status", "--socket", socket_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for label, provider in (("alpha", "a"), ("beta", "b")):
        (row,) = [line for line in lines if line.startswith(f"{provider}/{label} ")]
        assert fingerprints[label] in row and "ready" in row
    (dead,) = [line for line in lines if line.startswith("a/dead ")]
    (alive,) = [line for line in lines if line.startswith("b/alive ")]
    assert "open" in dead.split() and "closed" in alive.split()
    assert any(line.startswith("main ") and "a/dead > b/alive" in line for line in lines)

    as_json = routerd("status", "--json", "--socket", socket_path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {c["label"]: c["fingerprint"] for c in data["credentials"]} == fingerprints
    assert {t["target"]: t["breaker"] for t in data["targets"]} == {
        "a/dead": "open",
        "b/alive": "closed",
    }
    assert data["in_flight"] == 0 and data["connections"] == 1

    assert_no_key(table.stdout + table.stderr + as_json.stdout + as_json.stderr, [key_a, key_b])


def test_check_reports_every_schema_problem_and_can_leave_the_keys_out(short_dir: Path) -> None:
    config = short_dir / "three.toml"
    config.write_text(
        """\
[providers.openai]
kind = "openai"
base_url = "https://api.openai.com/v1"
strategy = "fastest"
credentials = [{ label = "a", key_evn = "CHECK_TEST_KEY_UNSET" }]

[routes.default]
chain = ["openai/gpt-4.1"]
deadline_s = "soon"
"""
    )
    result = routerd("check", "--config", str(config))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "providers.openai.strategy",
        "providers.openai.credentials[0].key_evn",
        "routes.default.deadline_s",
    ]
    assert "did you mean 'key_env'?" in lines[1]
    assert f"{config}: 3 problem(s)" in result.stderr

    # On a build machine: the file is checked, the key variable is not looked for.
    fixed = config.read_text().replace('strategy = "fastest"\n', "")
    fixed = fixed.replace("key_evn", "key_env").replace('deadline_s = "soon"', "deadline_s = 60")
    config.write_text(fixed)
    assert routerd("check", "--config", str(config)).returncode == 1  # its key is not set
    result = routerd("check", "--no-secrets", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok, as a file" in result.stdout and "not read" in result.stdout


def test_version_is_printed() -> None:
    result = routerd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"routerd {__version__}"


def test_status_without_a_daemon_says_where_it_looked(short_dir: Path) -> None:
    missing = short_dir / "nobody-home.sock"
    result = routerd("status", "--socket", str(missing))
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "is the daemon running" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""

    # The socket path can come from the config too.
    config = short_dir / "config.toml"
    config.write_text(
        f"""
[server]
socket = "{missing}"

[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{{ label = "alpha", key_env = "KEY_A" }}]

[routes.main]
chain = ["a/m1"]
"""
    )
    result = routerd("status", "--json", "--config", str(config))
    assert result.returncode == 1
    assert str(missing) in result.stderr


def test_check_names_the_key_and_the_line(short_dir: Path) -> None:
    pasted = canary("pasted")
    good = short_dir / "good.toml"
    good.write_text(
        """\
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{ label = "alpha", key_env = "KEY_A" }]

[routes.main]
chain = ["a/m1"]
"""
    )
    result = routerd("check", "--config", str(good), env={"KEY_A": canary("alpha")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{good}: ok (1 provider, 1 credential, 1 route)"

    # The same config without its key in the environment.
    result = routerd("check", "--config", str(good))
    assert result.returncode == 1
    assert f"{good}:4: providers.a.credentials[0].key_env" in result.stdout
    assert "KEY_A is not set" in result.stdout

    bad = short_dir / "bad.toml"
    bad.write_text(
        f"""\
[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
strategy = "fastest"
credentials = [{{ label = "alpha", key_env = "{pasted}" }}]

[routes.main]
chain = ["a/m1"]
"""
    )
    result = routerd("check", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:4: providers.a.strategy" in result.stdout
    assert "'fastest'" in result.stdout and "round_robin" in result.stdout
    assert "Traceback" not in result.stderr

    bad.write_text(bad.read_text().replace('strategy = "fastest"\n', ""))
    result = routerd("check", "--config", str(bad))
    assert result.returncode == 1
    # A key pasted where a variable's name belongs is caught, and never repeated.
    assert f"{bad}:4: providers.a.credentials[0].key_env: looks like an API key" in result.stdout
    assert_no_key(result.stdout + result.stderr, [pasted])

    bad.write_text(good.read_text().replace('chain = ["a/m1"]', 'chain = ["zz/m1"]\nretries = -1'))
    result = routerd("check", "--config", str(bad), env={"KEY_A": "x"})
    assert result.returncode == 1
    assert f"{bad}:7: routes.main.chain[0]: provider 'zz' is not defined" in result.stdout
    assert f"{bad}:8: routes.main.retries" in result.stdout
    assert "2 problem(s)" in result.stderr


def test_serve_refuses_a_taken_socket_and_a_bad_config_in_one_line(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    key = canary("alpha")
    mock = mock_provider(MockSpec(keys={key: KeySpec("alpha")}, models={"m1": ModelSpec()}))
    config = f"""\
[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "alpha", key_env = "KEY_A" }}]

[routes.main]
chain = ["a/m1"]
"""
    first = daemon(config, env={"KEY_A": key})
    env = {"KEY_A": key, "XDG_STATE_HOME": str(short_dir / "second-state")}

    second = routerd(
        "serve", "--config", str(first.config), "--socket", str(first.socket_path), env=env
    )
    assert second.returncode == 1
    assert f"routerd: another routerd is already listening on {first.socket_path}" in (
        second.stderr.splitlines()
    )
    assert "Traceback" not in second.stderr
    # The daemon that was there first keeps its socket and keeps serving.
    with Client(str(first.socket_path)) as client:
        assert client.chat("main", user("still mine")).text.endswith("still mine")

    too_long = short_dir / ("x" * 120 + ".sock")
    third = routerd("serve", "--config", str(first.config), "--socket", str(too_long), env=env)
    assert third.returncode == 1
    assert f"routerd: cannot listen on {too_long}" in third.stderr
    assert "Traceback" not in third.stderr

    bad = short_dir / "bad.toml"
    bad.write_text(config.replace('chain = ["a/m1"]', 'chain = ["a/m1"]\ndeadline_s = "soon"'))
    fourth = routerd("serve", "--config", str(bad), "--socket", str(short_dir / "b.sock"), env=env)
    assert fourth.returncode == 2
    assert f"{bad}:8: routes.main.deadline_s" in fourth.stderr
    assert "Traceback" not in fourth.stderr
    assert_no_key(second.stderr + third.stderr + fourth.stderr, [key])


async def test_canary_keys_never_leave_the_daemon(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    keys = {
        canary("good"): KeySpec("good"),
        canary("invalid"): KeySpec("invalid", kind="invalid"),
        canary("broke"): KeySpec("broke", kind="no_quota"),
    }
    env = {f"KEY_{spec.label.upper()}": key for key, spec in keys.items()}
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}))
    state = short_dir / "state.msgpack"
    config = f"""
[server]
state_file = "{state}"
state_flush_s = 0.2
log_level = "debug"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
strategy = "round_robin"
credentials = [
  {{ label = "good", key_env = "KEY_GOOD" }},
  {{ label = "invalid", key_env = "KEY_INVALID" }},
  {{ label = "broke", key_env = "KEY_BROKE" }},
]

[routes.main]
chain = ["mock/m1"]
"""
    daemon_process = daemon(config, env=env)
    socket_path = str(daemon_process.socket_path)
    failures: list[RouterdError] = []
    async with AsyncClient(socket_path) as client:

        async def one(n: int) -> None:
            if n % 3:
                await client.chat("main", user(f"chat {n}"))
            else:
                async for _ in client.stream("main", user(f"stream {n}")):
                    pass

        async with anyio.create_task_group() as tg:
            for n in range(12):
                tg.start_soon(one, n)
        try:
            await client.chat("main", user("[[mock:fail=503]]"))
        except TargetDown as exc:
            failures.append(exc)
        report = await client.status()

    assert len(failures) == 1
    states = {c.label: c.state for c in report.credentials}
    # Every kind of key was really used: the bad ones were tried and put aside.
    assert states == {"good": "ready", "invalid": "disabled", "broke": "parked"}, states
    called = set(mock.stats()["calls"])
    assert {"good", "invalid", "broke"} <= called

    status_json = routerd("status", "--json", "--socket", socket_path)
    status_table = routerd("status", "--socket", socket_path)
    assert status_json.returncode == 0 and status_table.returncode == 0
    assert daemon_process.stop() == 0

    secrets = list(keys)
    assert_no_key(status_json.stdout + status_json.stderr, secrets)
    assert_no_key(status_table.stdout + status_table.stderr, secrets)
    assert_no_key("".join(str(f) + repr(f.attempts) for f in failures), secrets)
    log = daemon_process.log_text()
    assert '"level":"debug"' in log  # the most talkative level was on
    assert_no_key(log, secrets)
    raw = state.read_bytes()
    assert raw  # the state was written ...
    for key in secrets:  # ... and holds fingerprints, not keys
        assert key.encode() not in raw and key[-24:].encode() not in raw


def test_status_into_a_closed_pipe_ends_quietly(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    # `routerd status --json | head -1`: the reader leaves before the report is written.
    key = canary("a")
    mock = mock_provider(MockSpec(keys={key: KeySpec("a")}, models={"m": ModelSpec()}))
    config = f"""
[providers.p]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "a", key_env = "KEY_A" }}]

[routes.main]
chain = ["p/m"]
"""
    daemon_process = daemon(config, env={"KEY_A": key})
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTERD_")}
        result = subprocess.run(
            [sys.executable, "-m", "routerd", "status", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**child_env, "ROUTERD_SOCKET": str(daemon_process.socket_path)},
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_status_interval_must_be_a_sensible_number_of_seconds(short_dir: Path) -> None:
    for interval in ("-1", "nan", "inf", "0", "soon"):
        result = routerd("status", "--watch", "--interval", interval, "--socket", str(short_dir))
        assert result.returncode == 2, (interval, result.stderr)
        assert "--interval" in result.stderr and "Traceback" not in result.stderr


def test_status_watch_ends_with_an_error_when_the_daemon_stops_answering(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "STATUS_TIMEOUT_S", 0.5)
    path = str(short_dir / "stopped.sock")
    codes: list[int] = []
    with FakeDaemon(path) as daemon:
        daemon.pause_reading()  # it takes the handshake, then reads nothing more
        watch = threading.Thread(
            target=lambda: codes.append(cli.main(["status", "--watch", "--socket", path]))
        )
        watch.start()
        watch.join(10)
        alive = watch.is_alive()
        daemon.pause_reading(False)
        watch.join(5)
    assert not alive and codes == [1]
    assert "routerd status:" in capsys.readouterr().err

"""server.event_loop: the daemon runs on uvloop when it is installed, on asyncio's loop when
told to, and says which in its log; asking for uvloop where it is missing is a config
problem that names the key and its line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from routerd_client import Client

from routerd import eventloop
from routerd.config.load import check_config
from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]


def loop_in_log(process: DaemonProcess) -> str:
    for line in process.log_text().splitlines():
        if '"listening"' in line:
            loop: str = json.loads(line)["loop"]
            return loop
    raise AssertionError(f"no listening line in the log:\n{process.log_text()}")


@pytest.mark.parametrize(("setting", "expected"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_the_daemon_serves_on_the_loop_it_is_given(
    mock_provider: MockFactory, daemon: DaemonFactory, setting: str | None, expected: str
) -> None:
    key = canary("alpha")
    mock = mock_provider(MockSpec(keys={key: KeySpec("alpha")}, models={"m1": ModelSpec()}))
    server = "" if setting is None else f'[server]\nevent_loop = "{setting}"\n'
    process = daemon(
        f"""{server}
[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "alpha", key_env = "KEY_A" }}]

[routes.main]
chain = ["a/m1"]
""",
        env={"KEY_A": key},
    )
    # uvloop is one of routerd's dependencies, so "auto" finds it.
    assert loop_in_log(process) == expected
    messages = [{"role": "user", "content": "hello"}]
    with Client(str(process.socket_path)) as client:
        assert client.chat("main", messages=messages).text
        chunks = list(client.stream("main", messages=messages))
        assert "".join(chunk.text for chunk in chunks)


def test_uvloop_asked_for_where_it_is_missing_is_a_config_problem(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short_dir / "c.toml"
    path.write_text(
        """\
[server]
event_loop = "uvloop"

[providers.a]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{ label = "alpha", key_env = "KEY_A" }]

[routes.main]
chain = ["a/m1"]
"""
    )
    assert check_config(path, secrets=False) == []
    monkeypatch.setattr(eventloop, "uvloop_installed", lambda: False)
    problems = [str(problem) for problem in check_config(path, secrets=False)]
    assert problems == [
        f"{path}:2: server.event_loop: uvloop is not installed here: install it "
        '(pip install uvloop) or use "auto"'
    ]
    assert eventloop.loop_options("auto") == {"use_uvloop": False}
    assert eventloop.loop_options("asyncio") == {"use_uvloop": False}

    path.write_text(path.read_text().replace('"uvloop"', '"fastest"'))
    problems = [str(problem) for problem in check_config(path, secrets=False)]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: server.event_loop")
    assert "'fastest'" in problems[0]

"""The state file is written while requests keep changing the daemon's state.

Requests naming new provider/model targets add to the target table between awaits; the
snapshot must be taken on the event loop, so a write running in a worker thread never
iterates a dict that the loop is changing (which raised "dictionary changed size during
iteration" and took the daemon down).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from routerd_client import Client, paths

from routerd import state as state_file
from routerd.config.load import parse_config
from routerd.config.secrets import resolve_secrets
from routerd.core.breaker import Breaker
from routerd.core.plan import Target
from routerd.daemon import Daemon


def make_daemon(directory: Path) -> Daemon:
    config = parse_config(
        f"""
[server]
state_file = "{directory / "state.msgpack"}"

[providers.p]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{{ label = "a", key_env = "KEY_A" }}]

[routes.main]
chain = ["p/m"]
"""
    )
    secrets = resolve_secrets(config, environ={"KEY_A": "sk-test-0123456789abcdef"})
    return Daemon(config, secrets, socket_path=directory / "d.sock")


def add_target(daemon: Daemon, n: int) -> None:
    name = f"p/adhoc-{n}"
    daemon.dispatcher.targets[name] = Target(
        name, "p", f"adhoc-{n}", "openai-compatible", "headroom", Breaker(name), pool=[]
    )


async def test_saving_while_targets_are_added_never_breaks(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    for n in range(20_000):
        add_target(daemon, n)
    async with daemon.http:
        for _round in range(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.save_state_async)
                # The loop keeps adding targets while the worker thread writes.
                for n in range(20_000 + _round * 2_000, 22_000 + _round * 2_000):
                    add_target(daemon, n)
                    if n % 50 == 0:
                        await anyio.lowlevel.checkpoint()
    for actor in daemon.actors.values():
        actor.close()  # never started in this test
    saved = state_file.load(tmp_path / "state.msgpack")
    assert saved is not None
    assert len(saved.breakers) >= 20_001


def test_the_daemon_and_its_clients_default_to_the_same_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rule: a hand-started daemon listens where a hand-started client looks."""
    system = tmp_path / "system.sock"
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", str(system))
    for name in ("ROUTERD_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    daemon = make_daemon(tmp_path)
    config = daemon.config
    secrets = resolve_secrets(config, environ={"KEY_A": "sk-test-0123456789abcdef"})
    cases = [({}, False), ({"XDG_RUNTIME_DIR": str(tmp_path)}, False), ({}, True)]
    for env, system_exists in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if system_exists:
            system.touch()
        for actor in daemon.actors.values():
            actor.close()
        daemon = Daemon(config, secrets)
        assert str(daemon.socket_path) == Client().path == paths.default_socket_path()
    assert str(daemon.socket_path) == str(system)
    for actor in daemon.actors.values():
        actor.close()

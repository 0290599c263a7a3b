"""Reloading the config of a running daemon: SIGHUP and `routerd reload`.

Under load no request fails; credentials the new config keeps keep their state, new ones
start fresh, dropped ones go; a config with errors is refused with check's messages while
the running one stays; systemd hears RELOADING=1 (with MONOTONIC_USEC), then READY=1.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import anyio
from routerd_client import AsyncClient, Client, RouterdError

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary
from tests.test_e2e_cli import routerd
from tests.test_e2e_pool import calls_by_label

MockFactory = Callable[[MockSpec], MockProcess]

KEYS = {
    "good": canary("good"),
    "revoked": canary("revoked"),
    "spare": canary("spare"),
    "other": canary("other"),
}


def config_text(mock: MockProcess, labels: list[str], *, deadline: int = 30) -> str:
    creds = ", ".join(
        f'{{ label = "{label}", key_env = "KEY_{label.upper()}" }}' for label in labels
    )
    return f"""
[server]
state_flush_s = 0.2

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{creds}]

[routes.main]
chain = ["mock/m"]
deadline_s = {deadline}
"""


def start(mock_provider: MockFactory, daemon: DaemonFactory) -> tuple[MockProcess, DaemonProcess]:
    mock = mock_provider(
        MockSpec(
            keys={
                KEYS["good"]: KeySpec("good"),
                KEYS["revoked"]: KeySpec("revoked", kind="invalid"),
                KEYS["spare"]: KeySpec("spare"),
                KEYS["other"]: KeySpec("other"),
            },
            models={"m": ModelSpec()},
            latency_ms=5,
        )
    )
    env = {f"KEY_{label.upper()}": key for label, key in KEYS.items()}
    process = daemon(config_text(mock, ["good", "revoked"]), env=env)
    return mock, process


def states(process: DaemonProcess) -> dict[str, str]:
    with Client(str(process.socket_path)) as client:
        return {c.label: c.state for c in client.status().credentials}


async def test_sighup_under_load_fails_no_request_and_keeps_what_it_learned(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock, process = start(mock_provider, daemon)
    failures: list[BaseException] = []
    served = 0
    stop = anyio.Event()

    async def load(client: AsyncClient) -> None:
        nonlocal served
        while not stop.is_set():
            try:
                await client.chat("main", messages=[{"role": "user", "content": "hi"}])
                served += 1
            except RouterdError as exc:
                failures.append(exc)

    async with AsyncClient(str(process.socket_path)) as client, anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(load, client)
        await anyio.sleep(0.5)
        config = process.config
        for n, labels in enumerate(
            (["good", "revoked", "spare"], ["good", "revoked", "spare"], ["good", "spare"])
        ):
            config.write_text(config_text(mock, labels, deadline=30 + n))
            process.process.send_signal(signal.SIGHUP)
            await anyio.sleep(0.7)
        stop.set()

    assert process.process.poll() is None, process.log_text()
    assert not failures, failures[:3]
    assert served > 50
    notes = process.collect()
    reloading = [n for n in notes if n.startswith("MONOTONIC_USEC=")]
    assert notes.count("RELOADING=1") == 3
    assert len(reloading) == 3 and all(int(n.split("=")[1]) > 0 for n in reloading)
    assert notes.count("READY=1") == 4
    # The revoked key was found once, before the reloads, and never called again.
    assert calls_by_label(mock)["revoked"] == {"401": 1}
    assert states(process) == {"good": "ready", "spare": "ready"}


async def test_routerd_reload_keeps_state_starts_new_keys_and_refuses_a_bad_config(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock, process = start(mock_provider, daemon)
    socket = str(process.socket_path)
    with Client(socket) as client:
        for _ in range(6):
            client.chat("main", messages=[{"role": "user", "content": "hi"}])
        before = {c.label: c for c in client.status().credentials}
    assert before["revoked"].state == "disabled"

    process.config.write_text(config_text(mock, ["good", "revoked", "spare"]))
    done = routerd("reload", "--socket", socket)
    assert done.returncode == 0, done.stderr
    assert "2 credential(s) kept" in done.stdout and "mock/spare" in done.stdout
    with Client(socket) as client:
        after = {c.label: c for c in client.status().credentials}
    assert after["revoked"].state == "disabled"
    assert after["good"].successes == before["good"].successes
    assert after["spare"].state == "ready" and after["spare"].successes == 0

    # A key replaced under the same label is a new key: it starts fresh.
    text = config_text(mock, ["good", "revoked", "spare"]).replace("KEY_REVOKED", "KEY_OTHER")
    process.config.write_text(text)
    assert routerd("reload", "--socket", socket).returncode == 0
    assert states(process)["revoked"] == "ready"

    bad = text.replace('strategy = "headroom"\n', "").replace(
        'kind = "openai-compatible"', 'kind = "openai-compatible"\nstrategy = "fastest"'
    )
    process.config.write_text(bad + '\n[routes.extra]\nchain = ["nowhere/m"]\n')
    refused = routerd("reload", "--socket", socket)
    assert refused.returncode == 1
    assert "providers.mock.strategy" in refused.stderr
    assert f"{process.config}:" in refused.stderr
    for key in KEYS.values():
        assert key not in refused.stderr + refused.stdout
    with Client(socket) as client:
        assert client.chat("main", messages=[{"role": "user", "content": "x"}]).provider == "mock"
        assert {c.label for c in client.status().credentials} == {"good", "revoked", "spare"}
    assert process.process.poll() is None
    assert "reload_refused" in process.log_text()


def test_reload_without_a_daemon_says_where_it_looked(short_dir: Path) -> None:
    missing = short_dir / "none.sock"
    result = routerd("reload", "--socket", str(missing))
    assert result.returncode == 1
    assert str(missing) in result.stderr

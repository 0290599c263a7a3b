"""Shared fixtures: the real mock provider process and the real daemon process."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from routerd.launch import DaemonProcess
from routerd.mock import MockProcess, MockSpec, start_mock_process
from routerd.upstream.proxy import VARIABLES as PROXY_VARIABLES
from tests.loopback import SERVING, Loopback, serve

# Every process the tests start talks to servers on loopback only: the machine's proxy
# variables (a CI machine may set them for its package registry) must not reach a daemon
# they start; a test that wants a proxy sets its own.
for _name in PROXY_VARIABLES:
    os.environ.pop(_name, None)


def canary(label: str) -> str:
    """A key that must never show up anywhere but in the request to the provider."""
    return f"sk-canary-{label}-{secrets.token_hex(12)}"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mock_provider() -> Iterator[Callable[[MockSpec], MockProcess]]:
    """Start mock provider processes; all are stopped at the end of the test."""
    started: list[MockProcess] = []

    def start(spec: MockSpec) -> MockProcess:
        process = start_mock_process(spec)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def daemon(short_dir: Path) -> Iterator[DaemonFactory]:
    """Start `routerd serve` processes with a config text; stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config: str, *, env: dict[str, str] | None = None, name: str = "d") -> DaemonProcess:
        path = short_dir / f"{name}.toml"
        path.write_text(config)
        # The default state file must not leak between tests (or into the user's home).
        isolated = {"XDG_STATE_HOME": str(short_dir / "state"), **(env or {})}
        process = DaemonProcess(
            path,
            socket_path=short_dir / f"{name}.sock",
            env=isolated,
            log_path=short_dir / f"{name}.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Loopback]:
    """A server on loopback for an adapter test; every host name resolves to it, and
    ``tests.loopback.answering`` aims it."""
    async for loopback in serve():
        SERVING.append(loopback)
        try:
            yield loopback
        finally:
            SERVING.remove(loopback)

"""Running the mock in a child process, for tests and ``routerd demo``."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import quote

import httpx
import msgspec

from routerd.launch import stop_child
from routerd.mock.spec import MockSpec, ModelSpec

# The directory holding the routerd package, so the child imports this very copy even
# when routerd is not installed.
_IMPORT_ROOT = Path(__file__).resolve().parents[2]
_CONTROL_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


class MockStartError(RuntimeError):
    """The mock process exited or stayed silent instead of announcing READY."""


class MockProcess:
    """A running mock provider process; a context manager that stops it on exit."""

    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url
        # One client for every control call: building one per call costs more than the call.
        self._control = httpx.Client(base_url=url, timeout=_CONTROL_TIMEOUT_S)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use, ending in /v1."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        """Call counts: {"calls": {label: {model: {status: n}}}, "total": n}."""
        response = self._control.get("/_mock/stats")
        response.raise_for_status()
        return cast(dict[str, Any], response.json())

    def set_model(self, name: str, model: ModelSpec) -> None:
        """Replace one model's spec in the running mock (start or end an outage)."""
        response = self._control.post(
            f"/_mock/models/{quote(name, safe='/')}", content=msgspec.json.encode(model)
        )
        response.raise_for_status()

    def reset(self) -> None:
        """Clear the call counts and every rate-limit window."""
        response = self._control.post("/_mock/reset")
        response.raise_for_status()

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL if it lingers) and reap it."""
        self._control.close()
        stop_child(self.process, _STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_mock_process(
    spec: MockSpec, *, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 15.0
) -> MockProcess:
    """Start ``python -m routerd.mock`` with ``spec`` and wait until it is serving."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_IMPORT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "routerd.mock", "--spec", "-", "--host", host, "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdin is not None
        process.stdin.write(msgspec.json.encode(spec))
        process.stdin.close()
        url = _await_ready(process, ready_timeout)
    except BaseException:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        raise
    return MockProcess(process, url)


def _await_ready(process: subprocess.Popen[bytes], timeout: float) -> str:
    """Read the child's stdout until its READY line; the URL it names."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MockStartError(f"mock did not announce READY within {timeout} s")
            if not selector.select(remaining):
                continue
            data = os.read(fd, 4096)
            if not data:
                code = process.wait(timeout=_STOP_TIMEOUT_S)
                raise MockStartError(f"mock exited with status {code} before READY")
            buffer += data
    line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line.startswith("READY "):
        raise MockStartError(f"unexpected first line from mock: {line!r}")
    return line.removeprefix("READY ")

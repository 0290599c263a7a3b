"""Start a real `routerd serve` process and know when it is ready, the way systemd does.

The launcher binds its own $NOTIFY_SOCKET and waits for the daemon's READY=1, so the demo,
the end-to-end tests and the benchmarks all use the daemon's real readiness signal.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self


def stop_child(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a child that still runs, wait ``timeout`` for it, then SIGKILL; its exit code."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class DaemonStartError(RuntimeError):
    """The daemon exited or stayed silent before READY=1."""


class DaemonProcess:
    """A running `routerd serve`; a context manager that stops it with SIGTERM."""

    def __init__(
        self,
        config: Path,
        *,
        socket_path: Path,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.config = config
        self.socket_path = socket_path
        self.notifications: list[str] = []
        self._workdir = tempfile.mkdtemp(prefix="routerd-launch-", dir="/tmp")
        self._notify_path = os.path.join(self._workdir, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self._notify_path)
        self._own_log = log_path is None
        self.log_path = log_path or Path(self._workdir) / "routerd.log"
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env["NOTIFY_SOCKET"] = self._notify_path
        child_env.setdefault("ROUTERD_LOG_FORMAT", "json")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd",
                "serve",
                "--config",
                str(config),
                "--socket",
                str(socket_path),
            ],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        try:
            self.wait_for("READY=1", ready_timeout)
        except BaseException:
            self.close()
            raise

    def wait_for(self, state: str, timeout: float) -> None:
        """Block until the daemon sends ``state`` (e.g. READY=1) to its notify socket."""
        deadline = time.monotonic() + timeout
        while state not in self.notifications:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonStartError(f"no {state} within {timeout} s; log:\n{self.log_text()}")
            if self.process.poll() is not None and not self._drain_notify(0.0):
                raise DaemonStartError(
                    f"routerd exited with {self.process.returncode} before {state}; "
                    f"log:\n{self.log_text()}"
                )
            self._drain_notify(min(left, 0.1))

    def collect(self) -> list[str]:
        """Every notification received so far, after reading all that are waiting."""
        while self._drain_notify(0.0):
            pass
        return self.notifications

    def _drain_notify(self, timeout: float) -> bool:
        self._notify.settimeout(timeout if timeout > 0 else None)
        if timeout <= 0:
            self._notify.setblocking(False)
        try:
            data = self._notify.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        self.notifications.extend(data.decode().splitlines())
        return True

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the drain to finish; returns the exit code."""
        code = stop_child(self.process, timeout)
        while self._drain_notify(0.0):
            pass
        return code

    def close(self) -> None:
        """Stop the daemon if it runs and release the notify socket and log file."""
        if self.process.poll() is None:
            self.stop()
        self._notify.close()
        self._log.close()
        Path(self._notify_path).unlink(missing_ok=True)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.rmdir(self._workdir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

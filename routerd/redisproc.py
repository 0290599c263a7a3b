"""A throw-away redis-server (or valkey-server) on a Unix socket, for tests and benchmarks.

Nothing is saved (``--save '' --appendonly no``) and nothing listens on TCP: the server
lives in its own directory and is stopped with it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from routerd.launch import stop_child


def server_binary() -> str | None:
    """The redis-server or valkey-server on $PATH, or None when neither is installed."""
    return shutil.which("redis-server") or shutil.which("valkey-server")


class RedisProcess:
    """A running server on ``socket_path``; ``kill`` and ``start`` again as a test needs."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        binary = server_binary()
        if binary is None:
            raise RuntimeError("neither redis-server nor valkey-server is installed")
        self.binary = binary
        self.directory = directory
        self.socket_path = directory / "redis.sock"
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The URL a [state] section names this server with."""
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again) and wait until it answers PING."""
        args = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start; see {self.directory}/redis.log")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # With a password set, the server answers NOAUTH: it is up all the same.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def kill(self) -> None:
        """Stop the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server, gently first."""
        if self.process is not None:
            stop_child(self.process, 10)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

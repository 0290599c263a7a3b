"""Serving the mock over loopback with uvicorn, and announcing the bound address.

The socket is bound here rather than by uvicorn so port 0 works: the real port is known
before serving, and ``READY http://HOST:PORT`` is printed once uvicorn is accepting.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from types import FrameType

import uvicorn

from routerd.mock.app import MockApp
from routerd.mock.connection import AbortableHttpToolsProtocol
from routerd.mock.spec import MockSpec
from routerd.mock.state import MockState

# Long enough for in-flight replies to finish; requests hanging on the "timeout" fault are
# cancelled after it rather than holding shutdown for an hour.
_GRACEFUL_SHUTDOWN_S = 1


class NotLoopbackError(ValueError):
    """A host outside loopback was asked for without allowing remote access."""


def is_loopback(host: str) -> bool:
    """True for loopback addresses and for "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, *, allow_remote: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0 picks a free one); loopback unless allowed."""
    if not allow_remote and not is_loopback(host):
        raise NotLoopbackError(f"{host} is not a loopback address (pass --allow-remote)")
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this; without it a small response written in two parts
        # waits ~40 ms for the client's delayed ACK (Nagle), on every kept-alive request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    """The http:// URL a bound socket answers on."""
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn Server that prints the READY line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self._url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"READY {self._url}", flush=True)


def serve(spec: MockSpec, sock: socket.socket) -> None:
    """Serve the mock on a bound socket until SIGTERM or SIGINT, then return normally."""
    config = uvicorn.Config(
        MockApp(MockState(spec)),
        http=AbortableHttpToolsProtocol,
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    server = _AnnouncingServer(config, url_of(sock))

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn re-raises the signal that stopped it once it is done, to give the previous
    # handler its turn; with this one in place that ends in a clean exit, not a signal death.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    server.run(sockets=[sock])


def main_serve(spec: MockSpec, host: str, port: int, *, allow_remote: bool) -> int:
    """Bind, serve, and return the process exit status."""
    try:
        sock = bind(host, port, allow_remote=allow_remote)
    except (NotLoopbackError, OSError) as exc:
        print(f"routerd.mock: {exc}", file=sys.stderr)
        return 2
    serve(spec, sock)
    return 0

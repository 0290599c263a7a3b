"""Binding the HTTP front's sockets and serving them inside the daemon.

The sockets are bound before the daemon's task group starts, so a port in use, a missing
token or a non-loopback address stops the daemon with one clear line instead of a
traceback. Each kind of listener (the Unix socket needs no token, TCP does) is a Site of
routerd's own HTTP server (``server.py``) with its own connection cap; its accept loops run
in the daemon's task group, and its stop follows the daemon's drain. The limits on request
bodies live in routerd.fronts.http.body.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from routerd.config.schema import ServerConfig
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.budget import BufferBudget
from routerd.fronts.http.app import FrontApp, FrontState
from routerd.fronts.http.connections import (
    LOG_INTERVAL_S,
    Gate,
    Throttle,
    accept_connections,
)
from routerd.fronts.http.metrics import Metrics
from routerd.fronts.http.responses_store import ResponseStore
from routerd.fronts.http.server import Site
from routerd.fronts.peers import PeerPolicy

log = structlog.get_logger("routerd.front")

# After the drain, responses still being written get this long before they are cancelled.
_GRACEFUL_S = 2
# How long stop() waits for the front to close its connections and return.
_STOP_TIMEOUT_S = 5.0


class FrontError(RuntimeError):
    """The HTTP front cannot start as configured; the message says why and what to change."""


@dataclass(slots=True)
class _Listener:
    sock: socket.socket
    address: str
    path: Path | None  # a Unix socket's path, removed on stop


def read_token(server: ServerConfig, environ: Mapping[str, str]) -> str:
    """The TCP listener's token; FrontError when its variable is unset or empty."""
    token = environ.get(server.http_token_env, "").strip()
    if not token:
        raise FrontError(
            f"server.http_listen is set, so the HTTP front needs a token, but the environment "
            f"variable {server.http_token_env} (server.http_token_env) is not set or empty"
        )
    return token


def bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``; a stale socket file is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: left behind by a process that died
        else:
            raise FrontError(f"something is already listening on {path} (server.http_socket)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): no client can connect while the mode is still the umask's.
        os.chmod(path, mode)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise FrontError(f"cannot listen on {path} (server.http_socket): {exc}") from None
    sock.setblocking(False)
    return sock


def bind_tcp(listen: str, *, allow_remote: bool) -> list[socket.socket]:
    """Listening TCP sockets for "host:port" (each address "localhost" has); loopback only
    unless ``allow_remote``. The config check already refused other hosts; this checks the
    addresses actually bound, so a name that resolves elsewhere cannot slip through."""
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:
        raise FrontError(f"cannot resolve server.http_listen {listen!r}: {exc}") from None
    addresses = list(dict.fromkeys(infos))
    for *_, address in addresses:
        ip = ipaddress.ip_address(str(address[0]).partition("%")[0])
        if not allow_remote and not ip.is_loopback:
            raise FrontError(
                f"server.http_listen {listen!r} resolves to {address[0]}, which is not a "
                "loopback address; the HTTP front holds every key, so it listens on "
                "loopback unless server.http_allow_remote = true"
            )
    sockets: list[socket.socket] = []
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it: SSE events go out at once, not after delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            # "localhost" names ::1 too, which a host without IPv6 cannot bind; one of the
            # addresses is enough then, but any other failure (a port in use) is fatal.
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and len(addresses) > 1:
                failure = exc
                continue
            for bound in sockets:
                bound.close()
            raise FrontError(f"cannot listen on {listen} (server.http_listen): {exc}") from None
        sock.setblocking(False)
        sockets.append(sock)
    if not sockets:
        raise FrontError(f"cannot listen on {listen} (server.http_listen): {failure}")
    return sockets


def _listeners(
    server: ServerConfig, activated: Sequence[socket.socket]
) -> tuple[_Listener | None, list[_Listener]]:
    """The Unix listener and the TCP ones: systemd's where it passed them, else bound here."""
    unix: _Listener | None = None
    tcp: list[_Listener] = []
    for sock in activated:
        if sock.family == socket.AF_UNIX and unix is None:
            unix = _Listener(sock, str(sock.getsockname()), None)  # systemd removes it
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            tcp.append(_Listener(sock, _address(sock), None))
        else:
            sock.close()
    if unix is None and server.http_socket is not None:
        path = Path(server.http_socket)
        unix = _Listener(bind_unix(path, server.socket_mode), str(path), path)
    if not tcp and server.http_listen is not None:
        try:
            socks = bind_tcp(server.http_listen, allow_remote=server.http_allow_remote)
        except BaseException:
            if unix is not None:
                _close(unix)
            raise
        tcp = [_Listener(sock, _address(sock), None) for sock in socks]
    return unix, tcp


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpFront:
    """The OpenAI/Anthropic-compatible HTTP front: its sockets and the sites serving them."""

    def __init__(
        self,
        state: FrontState,
        *,
        unix: _Listener | None,
        tcp: list[_Listener],
        token: str | None,
        peers: PeerPolicy | None = None,
        max_connections: int = 1000,
        keepalive_s: float = 5.0,
    ) -> None:
        self.state = state
        self.unix = unix
        self.tcp = tcp
        self._token = token
        self._peers = peers
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()

    @classmethod
    def open(
        cls,
        server: ServerConfig,
        dispatcher: Dispatcher,
        *,
        metrics: Metrics,
        draining: Callable[[], bool],
        environ: Mapping[str, str] | None = None,
        peers: PeerPolicy | None = None,
        budget: BufferBudget | None = None,
        max_connections: int | None = None,
        responses: ResponseStore | None = None,
        activated: Sequence[socket.socket] = (),
    ) -> HttpFront | None:
        """Bind the configured listeners; None when neither http_socket nor http_listen is set
        and systemd passed no HTTP socket.

        ``activated`` are the sockets systemd passed for the front (socket activation, named
        "http"): a Unix one serves in place of http_socket, TCP ones in place of
        http_listen, and systemd keeps owning them. ``budget`` is the daemon's buffer budget,
        shared with the msgpack front (a budget of server.buffer_budget of the front's own
        when None); ``max_connections`` caps the open connections of each kind of listener
        (server.max_connections when None; the daemon passes less when its file-descriptor
        limit allows less); ``responses`` the daemon's store of Responses API turns (one of
        the front's own when None). Raises FrontError (a RuntimeError) with a message for
        the operator.
        """
        unix, tcp = _listeners(server, activated)
        if unix is None and not tcp:
            return None
        env = os.environ if environ is None else environ
        try:
            token = read_token(server, env) if tcp else None
        except BaseException:
            for listener in [*([unix] if unix else []), *tcp]:
                _close(listener)
            raise
        state = FrontState(
            dispatcher,
            metrics,
            draining,
            server.max_frame,
            budget=budget if budget is not None else BufferBudget(server.buffer_budget),
            read_timeout_s=server.read_timeout_s,
            responses=responses if responses is not None else ResponseStore(),
        )
        return cls(
            state,
            unix=unix,
            tcp=tcp,
            token=token,
            peers=peers,
            max_connections=server.max_connections if max_connections is None else max_connections,
            keepalive_s=server.http_keepalive_s,
        )

    @property
    def addresses(self) -> list[str]:
        """Where the front listens: the Unix socket's path and each TCP host:port."""
        return ([self.unix.address] if self.unix else []) + [t.address for t in self.tcp]

    def _sites(self) -> list[tuple[Site, list[socket.socket]]]:
        plan: list[tuple[Site, list[socket.socket]]] = []
        if self.unix is not None:
            site = self._site("unix", token=None, peers=self._peers)
            plan.append((site, [self.unix.sock]))
        if self.tcp:
            site = self._site("tcp", token=self._token, peers=None)
            plan.append((site, [t.sock for t in self.tcp]))
        return plan

    def _site(self, listener: str, *, token: str | None, peers: PeerPolicy | None) -> Site:
        return Site(
            FrontApp(self.state, token=token),
            Gate(listener, self._max_connections),
            head_timeout_s=self.state.read_timeout_s,
            keepalive_s=self._keepalive_s,
            peers=peers,
        )

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop() (or cancellation); the sockets are closed on the way out."""
        plan = self._sites()
        failures = Throttle(LOG_INTERVAL_S)
        try:
            async with anyio.create_task_group() as tg:
                for site, socks in plan:
                    for sock in socks:
                        tg.start_soon(accept_connections, sock, site.protocol, failures)
                # The sockets already listen: a client connecting now waits in the backlog.
                log.info(
                    "http_listening",
                    addresses=self.addresses,
                    token=bool(self._token),
                    max_connections=self._max_connections,
                )
                task_status.started()
                await self._stopping.wait()
                tg.cancel_scope.cancel()  # no new connection while the open ones close
            async with anyio.create_task_group() as tg:
                for site, _ in plan:
                    tg.start_soon(site.shutdown, _GRACEFUL_S)
        finally:
            for site, _ in plan:
                site.abort()
            self._close_all()
            self._stopped.set()

    async def stop(self) -> None:
        """After the daemon's drain: end what still runs, let the connections close, return."""
        self.state.cancel_all()
        self._stopping.set()
        with anyio.move_on_after(_STOP_TIMEOUT_S):
            await self._stopped.wait()

    def _close_all(self) -> None:
        for listener in [*([self.unix] if self.unix else []), *self.tcp]:
            _close(listener)


def _close(listener: _Listener) -> None:
    listener.sock.close()
    if listener.path is not None:
        listener.path.unlink(missing_ok=True)

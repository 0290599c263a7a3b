"""The daemon: actors, targets and routes built from the config, run under one root task group.

Start-up order: restore the state file, start every credential actor, listen on the socket
(or take it from systemd), then READY=1. SIGTERM or SIGINT: STOPPING=1, stop accepting,
drain in-flight requests up to ``drain_timeout_s``, cancel the rest, save the state.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import structlog
from anyio.abc import SocketListener, SocketStream, TaskStatus
from routerd_client.protocol import StatusReport

from routerd import __version__, sdnotify
from routerd import state as state_file
from routerd.accept import connection_cap
from routerd.actor import CredentialActor
from routerd.breaker import Breaker
from routerd.budget import BufferBudget
from routerd.config import Config, split_target
from routerd.credential import CredentialState, LocalLimit
from routerd.dispatch import Dispatcher, ProviderRuntime, Route
from routerd.front import HttpFront, Metrics
from routerd.peers import PeerPolicy
from routerd.plan import Target
from routerd.secrets import Secret
from routerd.server import Connection, serve_clients
from routerd.status import build_report
from routerd.upstream import adapter_for

log = structlog.get_logger("routerd.daemon")

VERSION = __version__

# Well-known context windows, used where the config names none.
KNOWN_WINDOWS: dict[str, int] = {
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude-sonnet-4-5": 200_000,
    "claude-opus-4-1": 200_000,
    "claude-haiku-4-5": 200_000,
    "llama-3.3-70b-versatile": 131_072,
    "meta-llama/llama-3.3-70b-instruct": 131_072,
    "gemini-2.5-pro": 1_048_576,
    "gemini-2.5-flash": 1_048_576,
}


# What a request must carry to use a model's long-context window, per API kind.
LONG_CONTEXT_HEADERS: dict[str, dict[str, str]] = {
    "anthropic": {"anthropic-beta": "context-1m-2025-08-07"},
}


def default_socket_path() -> Path:
    """Where the daemon listens when the config names no socket."""
    if env := os.environ.get("ROUTERD_SOCKET"):
        return Path(env)
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0]) / "routerd.sock"
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "routerd" / "routerd.sock"
    return Path(f"/tmp/routerd-{os.getuid()}") / "routerd.sock"


def default_state_path() -> Path:
    """Where the state file lives when the config names none."""
    if state_dir := os.environ.get("STATE_DIRECTORY"):
        return Path(state_dir.split(":")[0]) / "state.msgpack"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "routerd" / "state.msgpack"


class Daemon:
    """One routerd process: its dispatcher, actors and listener."""

    def __init__(
        self,
        config: Config,
        secrets: list[Secret],
        *,
        socket_path: Path | None = None,
        state_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.socket_path = socket_path or (
            Path(config.server.socket) if config.server.socket else default_socket_path()
        )
        self.state_path = state_path or (
            Path(config.server.state_file) if config.server.state_file else default_state_path()
        )
        self.started = clock()
        self.connections = 0
        self.draining = False
        self._dirty = False
        self._save_now = anyio.Event()
        self._save_lock = anyio.Lock()
        self._owns_socket = False
        self.peers = PeerPolicy(config.server.allowed_users, config.server.allowed_groups)
        # Bytes all incomplete frames and request bodies may hold, shared by both fronts.
        self.buffer_budget = BufferBudget(config.server.buffer_budget)
        # The HTTP front (routerd.front): bound in run(), served beside the msgpack listener.
        self.front: HttpFront | None = None
        self.metrics = Metrics(lambda: self.status(0))
        self.http = httpx.AsyncClient(
            timeout=None,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            follow_redirects=False,
        )
        self.actors = self._build_actors(secrets)
        self._pools: dict[str, list[CredentialState]] = {}
        for (provider, _), actor in self.actors.items():
            self._pools.setdefault(provider, []).append(actor.state)
        providers = {
            name: ProviderRuntime(
                name=name,
                adapter=adapter_for(p.kind, self.http),
                base_url=p.base_url,
                timeout_s=p.timeout_s,
                headers=dict(p.headers),
            )
            for name, p in config.providers.items()
        }
        self._targets: dict[str, Target] = {}
        routes: dict[str, Route] = {}
        for route_name, route in config.routes.items():
            chain: list[Target] = []
            for name in route.chain:
                target = self.target(name)
                if target is None:  # load_config rejects this; a Config built in code may not
                    raise ValueError(f"route {route_name!r}: no provider for target {name!r}")
                chain.append(target)
            routes[route_name] = Route(route_name, chain, route.deadline_s, route.retries)
        self.dispatcher = Dispatcher(
            routes,
            self._targets,
            self.actors,
            providers,
            make_target=lambda name: self.target(name, keep=False),
            clock=clock,
            rng=random.Random(),
            on_change=self._changed,
            default_deadline_s=max((r.deadline_s for r in config.routes.values()), default=120.0),
            observer=self.metrics.observe,
            max_adhoc_targets=config.server.max_adhoc_targets,
            adhoc_idle_s=config.server.adhoc_idle_s,
            on_drop=self.metrics.forget,
        )

    def _build_actors(self, secrets: list[Secret]) -> dict[tuple[str, str], CredentialActor]:
        actors: dict[tuple[str, str], CredentialActor] = {}
        for order, secret in enumerate(secrets):
            provider = self.config.providers[secret.provider]
            state = CredentialState(
                provider=secret.provider,
                label=secret.label,
                fingerprint=secret.fingerprint,
                order=order,
                max_concurrent=secret.max_concurrent,
                rpm=LocalLimit(secret.rpm) if secret.rpm else None,
                tpm=LocalLimit(secret.tpm) if secret.tpm else None,
                quota_park_s=provider.quota_park_s,
                auth_probe_s=provider.auth_probe_s,
            )
            actors[(secret.provider, secret.label)] = CredentialActor(
                state,
                secret,
                mailbox_size=self.config.server.mailbox_size,
                on_change=self._changed,
                clock=self.clock,
                on_lasting=self._lasting_change,
            )
        return actors

    def target(self, name: str, *, keep: bool = True) -> Target | None:
        """The target "provider/model", None when the provider is unknown.

        The config's targets are built once and kept (chains share them). One a request
        names is built with ``keep`` False: the dispatcher alone keeps it, within
        server.max_adhoc_targets and server.adhoc_idle_s.
        """
        if name in self._targets:
            return self._targets[name]
        try:
            provider, model = split_target(name)
        except ValueError:
            return None
        provider_config = self.config.providers.get(provider)
        if provider_config is None:
            return None
        model_config = self.config.models.get(name)
        breaker = self.config.breaker
        context_window = model_config.context_window if model_config else None
        target = Target(
            name=name,
            provider=provider,
            model=model,
            kind=provider_config.kind,
            strategy=provider_config.strategy,
            breaker=Breaker(name, breaker.failure_threshold, breaker.open_s, breaker.max_open_s),
            pool=self._pools.get(provider, []),
            context_window=context_window or KNOWN_WINDOWS.get(model),
            long_context_window=model_config.long_context_window if model_config else None,
            long_context_headers=LONG_CONTEXT_HEADERS.get(provider_config.kind, {}),
        )
        if keep:
            self._targets[name] = target
        return target

    # ---- state ------------------------------------------------------------------------

    def _changed(self) -> None:
        self._dirty = True
        self.dispatcher.notify()

    def restore_state(self) -> None:
        """Read the state file back, if there is one; a damaged one is logged and ignored."""
        try:
            saved = state_file.load(self.state_path)
        except (ValueError, OSError) as exc:
            log.warning("state_unreadable", path=str(self.state_path), error=str(exc))
            return
        if saved is None:
            return
        matched = state_file.restore(
            saved,
            (a.state for a in self.actors.values()),
            (t.breaker for t in self.dispatcher.targets.values()),
            self.dispatcher.rotations,
            self.clock(),
            time.time(),
        )
        log.info("state_restored", path=str(self.state_path), credentials=matched)

    def _snapshot(self) -> state_file.StateFile:
        # On the event loop: requests add targets and change credentials between awaits, so
        # a snapshot taken in a worker thread could see a dict change size mid-iteration.
        return state_file.snapshot(
            [a.state for a in self.actors.values()],
            [t.breaker for t in self.dispatcher.targets.values()],
            dict(self.dispatcher.rotations),
            self.clock(),
            time.time(),
        )

    def save_state(self) -> None:
        """Write the state file now, from the event loop's thread (blocking)."""
        self._dirty = False
        state_file.save(self.state_path, self._snapshot())

    async def save_state_async(self) -> None:
        """Snapshot on the loop, write in a worker thread; failures are logged, not raised."""
        self._dirty = False
        snapshot = self._snapshot()
        async with self._save_lock:  # one writer at a time, so an older snapshot never wins
            try:
                await anyio.to_thread.run_sync(state_file.save, self.state_path, snapshot)
            except OSError as exc:
                self._dirty = True
                log.error("state_save_failed", path=str(self.state_path), error=str(exc))

    def _lasting_change(self) -> None:
        self._dirty = True
        self._save_now.set()

    async def _flush_state(self) -> None:
        while True:
            with anyio.move_on_after(self.config.server.state_flush_s):
                await self._save_now.wait()
            self._save_now = anyio.Event()
            if self._dirty:
                await self.save_state_async()

    # ---- serving ----------------------------------------------------------------------

    def status(self, request_id: int) -> StatusReport:
        """The StatusReport for a Status frame."""
        return build_report(
            request_id,
            self.dispatcher,
            self.clock(),
            version=VERSION,
            uptime_s=self.clock() - self.started,
            connections=self.connections,
        )

    async def _handle(self, stream: SocketStream) -> None:
        self.connections += 1
        try:
            connection = Connection(
                stream,
                self.dispatcher,
                max_frame=self.config.server.max_frame,
                status=self.status,
                draining=lambda: self.draining,
                version=VERSION,
                budget=self.buffer_budget,
                read_timeout_s=self.config.server.read_timeout_s,
                peers=self.peers,
            )
            await connection.serve()
        except Exception:
            log.exception("connection_crashed")
        finally:
            self.connections -= 1

    async def _listen(self) -> SocketListener:
        for name, sock in sdnotify.listen_sockets():
            if sock.family == socket.AF_UNIX and name in (None, "msgpack", "routerd.socket"):
                log.info("socket_activated", name=name)
                return await SocketListener.from_socket(sock)
        path = self.socket_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            if path.exists() or path.is_symlink():
                if await _socket_in_use(path):
                    raise RuntimeError(f"another routerd is already listening on {path}")
                path.unlink()
            listener = await anyio.create_unix_listener(path, mode=self.config.server.socket_mode)
        except OSError as exc:
            # `routerd serve` prints a RuntimeError as one line; a bare OSError names no path.
            raise RuntimeError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        self._owns_socket = True
        return listener

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or until cancelled), then drain and save."""
        self.restore_state()
        # Bound before the task group, so a bad HTTP set-up fails as one RuntimeError.
        self.front = HttpFront.open(
            self.config.server,
            self.dispatcher,
            metrics=self.metrics,
            draining=lambda: self.draining,
            peers=self.peers,
        )
        async with self.http, anyio.create_task_group() as root:
            for actor in self.actors.values():
                await root.start(actor.run)
            if self.front is not None:
                await root.start(self.front.serve)
            root.start_soon(self._flush_state)
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                root.start_soon(sdnotify.watchdog_loop, interval)
            listener = await self._listen()
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with anyio.create_task_group() as connections:
                    accepting = anyio.CancelScope()

                    front = len(self.front.addresses) if self.front is not None else 0
                    cap = connection_cap(self.config.server.max_connections, listeners=1 + front)

                    async def accept() -> None:
                        with accepting:
                            await serve_clients(
                                listener, self._handle, max_connections=cap, task_group=connections
                            )

                    connections.start_soon(accept)
                    log.info("listening", socket=str(self.socket_path), pid=os.getpid())
                    sdnotify.notify("READY=1", f"STATUS=listening on {self.socket_path}")
                    task_status.started()
                    async for signum in signals:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        break
                    await self._drain(accepting, listener)
                    connections.cancel_scope.cancel()
            with anyio.move_on_after(5, shield=True):
                await self.save_state_async()
            root.cancel_scope.cancel()
        log.info("stopped")

    async def _drain(self, accepting: anyio.CancelScope, listener: SocketListener) -> None:
        sdnotify.notify("STOPPING=1", "STATUS=draining in-flight requests")
        self.draining = True
        accepting.cancel()
        await listener.aclose()
        if self._owns_socket:
            # A socket systemd holds stays; ours goes, so clients see "not running".
            self.socket_path.unlink(missing_ok=True)
        with anyio.move_on_after(self.config.server.drain_timeout_s):
            await self.dispatcher.wait_idle()
        if self.dispatcher.in_flight:
            log.warning("drain_timeout", cancelled=self.dispatcher.in_flight)
        if self.front is not None:
            # The HTTP front kept answering 503 during the drain; now it closes.
            await self.front.stop()


async def _socket_in_use(path: Path) -> bool:
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        return False
    await stream.aclose()
    return True

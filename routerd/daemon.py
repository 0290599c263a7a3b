"""The daemon: actors, targets and routes built from the config, run under one root task group.

Start-up order: restore the state file, start every credential actor, listen on the socket
(or take it from systemd), then READY=1. SIGTERM or SIGINT: STOPPING=1, stop accepting,
drain in-flight requests up to ``drain_timeout_s``, tell the rest they were not finished,
save the state. SIGHUP (or `routerd reload`): RELOADING=1, re-read the config in place
(``reload.py`` has the rules), READY=1; a config with errors is refused and the running one
stays.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus
from routerd_client.paths import default_socket_path
from routerd_client.protocol import Error, Reloaded, StatusReport

from routerd import __version__, sdnotify
from routerd import state as state_file
from routerd.build import (
    build_routes,
    build_target,
    connection_caps,
    credential_state,
    default_deadline,
    pools_of,
    provider_runtimes,
)
from routerd.config.load import load_config, read_config_text
from routerd.config.problems import ConfigError, ConfigProblem
from routerd.config.schema import Config
from routerd.config.secrets import Secret, resolve_secrets
from routerd.core.affinity import Affinity
from routerd.core.plan import Target
from routerd.dispatch.actor import CredentialActor
from routerd.dispatch.dispatcher import Dispatcher
from routerd.eventloop import freeze_startup_heap, ignore_late_signals, loop_name
from routerd.fleet.link import FleetLink
from routerd.fleet.setup import connect_fleet
from routerd.fronts.budget import BufferBudget
from routerd.fronts.http import HttpFront, Metrics
from routerd.fronts.http.responses_store import StoreFile
from routerd.fronts.msgpack.accept import listen_unix
from routerd.fronts.msgpack.server import Connection, serve_clients
from routerd.fronts.msgpack.stream import UnixListener
from routerd.fronts.peers import PeerPolicy
from routerd.reload import ReloadSummary, plan_credentials, repool, reroute, restart_needed
from routerd.status import build_report
from routerd.upstream.session import Proxies, UpstreamSession

log = structlog.get_logger("routerd.daemon")


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
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        state_password: str | None = None,
        proxies: Proxies | None = None,  # the environment's (upstream/proxy.py); None: none
    ) -> None:
        self.config = config
        # Where SIGHUP and `routerd reload` read the config again; None: reload is refused.
        self.config_path = config_path
        self.clock = clock
        self.socket_path = socket_path or (Path(config.server.socket or default_socket_path()))
        self.state_path = state_path or (
            Path(config.server.state_file) if config.server.state_file else default_state_path()
        )
        self.started = clock()
        self.connections = 0
        self.draining = False
        self.reloads = 0
        self._dirty = False
        self._save_now = anyio.Event()
        self._save_lock = anyio.Lock()
        self._reload_lock = anyio.Lock()
        self._owns_socket = False
        self._root: TaskGroup | None = None
        self._actor_scopes: dict[CredentialActor, anyio.CancelScope] = {}
        self.peers = PeerPolicy(config.server.allowed_users, config.server.allowed_groups)
        # Bytes all incomplete frames and request bodies may hold, shared by both fronts.
        self.buffer_budget = BufferBudget(config.server.buffer_budget)
        self.max_connections, upstream = connection_caps(config.server)
        # The HTTP front (routerd.fronts.http): bound in run(), served beside the msgpack listener.
        self.front: HttpFront | None = None
        self.metrics = Metrics(lambda: self.status(0))
        # The Responses API's answered turns, kept beside the state file.
        self._responses_file = StoreFile.beside(self.state_path, config.server)
        self.responses = self._responses_file.store
        self.http = UpstreamSession(upstream, proxies=proxies)
        self.actors = {
            (s.provider, s.label): self._make_actor(s, n, config) for n, s in enumerate(secrets)
        }
        self._pools = pools_of(self.actors)
        self._targets: dict[str, Target] = {}
        self.dispatcher = self._dispatcher(config, clock)
        self.fleet = self._fleet(state_password)

    def _dispatcher(self, config: Config, clock: Callable[[], float]) -> Dispatcher:
        """The dispatcher over the routes, targets and actors built above."""
        return Dispatcher(
            build_routes(config, self._targets, self._pools),
            self._targets,
            self.actors,
            provider_runtimes(config, self.http),
            make_target=lambda name: build_target(name, self.config, self._pools),
            clock=clock,
            rng=random.Random(),
            on_change=self._changed,
            default_deadline_s=default_deadline(config),
            observer=self.metrics.observe,
            max_adhoc_targets=config.server.max_adhoc_targets,
            adhoc_idle_s=config.server.adhoc_idle_s,
            on_drop=self.metrics.forget,
            affinity=Affinity(config.server.affinity_sessions, config.server.affinity_idle_s),
        )

    def _fleet(self, password: str | None) -> FleetLink | None:
        """[state] backend = "redis": the link to the other hosts sharing these keys."""
        registry = self.metrics.registry
        return connect_fleet(self.config.state, password, self.dispatcher, registry, self._changed)

    def _make_actor(self, secret: Secret, order: int, config: Config) -> CredentialActor:
        return CredentialActor(
            credential_state(secret, config, order),
            secret,
            mailbox_size=config.server.mailbox_size,
            on_change=self._changed,
            clock=self.clock,
            on_lasting=self._lasting_change,
        )

    # ---- reload -----------------------------------------------------------------------

    async def reload(self) -> ReloadSummary:
        """Re-read the config file and apply it in place; raises ConfigError when it has
        errors (the running config then stays, untouched)."""
        if self.config_path is None:
            raise ConfigError(
                [ConfigProblem("<config>", None, "", "routerd was started without a config file")]
            )
        async with self._reload_lock:
            sdnotify.notify(*sdnotify.reloading(), "STATUS=reloading the config")
            try:
                path = self.config_path
                config = load_config(path)
                secrets = resolve_secrets(config, source=str(path), text=read_config_text(path))
                summary = await self._apply(config, secrets)
            except ConfigError as exc:
                log.error("reload_refused", path=str(self.config_path), problems=str(exc))
                sdnotify.notify("READY=1", "STATUS=config reload refused; the old config runs")
                raise
            self.reloads += 1
            log.info("config_reloaded", path=str(self.config_path), summary=summary.describe())
            sdnotify.notify("READY=1", f"STATUS=listening on {self.socket_path}")
            return summary

    async def _reload_reply(self, request_id: int) -> Reloaded | Error:
        """A Reload frame's answer: what the reload did, or every problem of the config."""
        try:
            summary = await self.reload()
        except ConfigError as exc:
            return Error(request_id, "config_error", f"config refused, the old one runs:\n{exc}")
        return Reloaded(request_id, summary.describe())

    async def _apply(self, config: Config, secrets: list[Secret]) -> ReloadSummary:
        old = self.config
        # Resolve names first: a user or group that does not exist refuses the whole config.
        try:
            peers = PeerPolicy(config.server.allowed_users, config.server.allowed_groups)
        except KeyError as exc:
            problem = ConfigProblem(str(self.config_path), None, "server", f"unknown {exc}")
            raise ConfigError([problem]) from None
        credentials = plan_credentials(
            self.actors, secrets, config, lambda s, n: self._make_actor(s, n, config)
        )
        for actor in credentials.added:
            if self._root is not None:
                self._actor_scopes[actor] = scope = anyio.CancelScope()
                await self._root.start(_run_actor, actor, scope)
        for actor in credentials.removed:
            if actor in self._actor_scopes:
                self._actor_scopes.pop(actor).cancel()
            else:
                actor.close()
        # Everything below is synchronous: no request sees half a config.
        self.config = config
        self.peers.replace(peers)
        self.actors.clear()
        self.actors.update(credentials.actors)
        repool(self._pools, self.actors)
        self.dispatcher.providers.clear()
        self.dispatcher.providers.update(provider_runtimes(config, self.http))
        reroute(self.dispatcher.routes, self._targets, self._pools, old, config)
        self.dispatcher.configure(
            default_deadline_s=default_deadline(config),
            max_adhoc_targets=config.server.max_adhoc_targets,
            adhoc_idle_s=config.server.adhoc_idle_s,
            configured={t for route in config.routes.values() for t in route.chain},
        )
        if self.fleet is not None:
            self.fleet.refresh()
        if config.state != old.state:
            log.warning("reload_state_unchanged", detail="[state] changes take a restart")
        self._lasting_change()
        self.dispatcher.notify()
        return ReloadSummary(
            kept=len(credentials.kept),
            added=[f"{a.state.provider}/{a.state.label}" for a in credentials.added],
            removed=[f"{a.state.provider}/{a.state.label}" for a in credentials.removed],
            routes=len(config.routes),
            restart_needed=restart_needed(old.server, config.server),
        )

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
            self.dispatcher.affinity,
        )
        log.info("state_restored", path=str(self.state_path), credentials=matched)

    def _snapshot(self) -> state_file.StateFile:
        # On the event loop: requests add targets and change credentials between awaits, so
        # a snapshot taken in a worker thread could see a dict change size mid-iteration.
        self.dispatcher.catch_up()
        return state_file.snapshot(
            [a.state for a in self.actors.values()],
            [t.breaker for t in self.dispatcher.targets.values()],
            dict(self.dispatcher.rotations),
            self.clock(),
            time.time(),
            self.dispatcher.affinity,
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
            await self._responses_file.save()

    # ---- serving ----------------------------------------------------------------------

    def status(self, request_id: int) -> StatusReport:
        """The StatusReport for a Status frame."""
        return build_report(
            request_id,
            self.dispatcher,
            self.clock(),
            version=__version__,
            uptime_s=self.clock() - self.started,
            connections=self.connections,
            shared=self.fleet.shared if self.fleet is not None else None,
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
                version=__version__,
                budget=self.buffer_budget,
                read_timeout_s=self.config.server.read_timeout_s,
                peers=self.peers,
                reload=self._reload_reply,
            )
            await connection.serve()
        except Exception:
            log.exception("connection_crashed")
        finally:
            self.connections -= 1

    async def _listen(self, inherited: list[socket.socket]) -> SocketListener:
        if inherited:
            return UnixListener(inherited[0])
        listener = await listen_unix(self.socket_path, self.config.server.socket_mode)
        self._owns_socket = True
        return listener

    def _open_front(self, activated: list[socket.socket]) -> HttpFront | None:
        """The HTTP front on the configured sockets, or on those systemd passed."""
        return HttpFront.open(
            self.config.server,
            self.dispatcher,
            metrics=self.metrics,
            draining=lambda: self.draining,
            peers=self.peers,
            budget=self.buffer_budget,
            max_connections=self.max_connections,
            responses=self.responses,
            activated=activated,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or until cancelled), then drain and save."""
        self.restore_state()
        self._responses_file.restore()
        msgpack_socket, http_sockets = sdnotify.front_sockets()
        if msgpack_socket or http_sockets:
            log.info("socket_activated", msgpack=len(msgpack_socket), http=len(http_sockets))
        # Bound before the task group, so a bad HTTP set-up fails as one RuntimeError.
        self.front = self._open_front(http_sockets)
        async with self.http, anyio.create_task_group() as root:
            self._root = root
            for actor in self.actors.values():
                self._actor_scopes[actor] = scope = anyio.CancelScope()
                await root.start(_run_actor, actor, scope)
            if self.front is not None:
                await root.start(self.front.serve)
            root.start_soon(self._flush_state)
            if self.fleet is not None and self.fleet.shared is not None:
                await root.start(self.fleet.shared.run)
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                root.start_soon(sdnotify.watchdog_loop, interval)
            listener = await self._listen(msgpack_socket)
            stop_signals = (signal.SIGTERM, signal.SIGINT)
            with anyio.open_signal_receiver(*stop_signals, signal.SIGHUP) as signals:
                async with anyio.create_task_group() as connections:
                    accepting = anyio.CancelScope()
                    cap = self.max_connections

                    async def accept() -> None:
                        with accepting:
                            await serve_clients(
                                listener, self._handle, max_connections=cap, task_group=connections
                            )

                    connections.start_soon(accept)
                    where = str(self.socket_path)
                    loop = loop_name()
                    log.info("listening", socket=where, pid=os.getpid(), max_conn=cap, loop=loop)
                    sdnotify.notify("READY=1", f"STATUS=listening on {self.socket_path}")
                    task_status.started()
                    freeze_startup_heap()
                    async for signum in signals:
                        if signum in stop_signals:
                            log.info("stopping", signal=signal.Signals(signum).name)
                            break
                        # SIGHUP: the outcome is logged; a refused config changes nothing.
                        with contextlib.suppress(ConfigError):
                            await self.reload()
                    await self._drain(accepting, listener)
                    connections.cancel_scope.cancel()
                # Still receiving: another SIGTERM while the state is saved is taken, not fatal.
                with anyio.move_on_after(5, shield=True):
                    await self.save_state_async()
                    await self._responses_file.save(force=True)
            ignore_late_signals(stop_signals)
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


async def _run_actor(
    actor: CredentialActor,
    scope: anyio.CancelScope,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one actor inside its own cancel scope, so a reload can stop it alone."""
    with scope:
        await actor.run(task_status=task_status)

"""The accept loop of a listening socket: a cap on open connections, and back-off on errors.

Past the cap a connection is still accepted, so its client can be told why, and then turned
away. When accept() itself fails for want of descriptors or memory, the loop backs off and
tries again (``routerd.fronts.accepting``). Those failures are logged at most once per
``LOG_EVERY_S``, with a count, so a flood cannot flood the log too.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskGroup

from routerd.fronts.accepting import BACKOFF_START_S, TRANSIENT_ERRNOS, next_backoff
from routerd.fronts.msgpack.stream import UnixListener, bind_unix

log = structlog.get_logger("routerd.accept")

LOG_EVERY_S = 10.0
#: Connections over the cap that may be in the middle of being told so; past this many,
#: more are closed at once, since each one holds a descriptor.
MAX_TURNING_AWAY = 64

Handler = Callable[[SocketStream], Awaitable[None]]


class Throttled:
    """A warning logged at most once per ``every_s``, carrying how often it happened."""

    def __init__(
        self, event: str, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event = event
        self.every_s = every_s
        self.clock = clock
        self.count = 0
        self.total = 0
        self._last: float | None = None

    def note(self, **fields: object) -> bool:
        """Count one occurrence; log it (with the count since the last line) if it is time."""
        self.count += 1
        self.total += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return False
        log.warning(self.event, count=self.count, **fields)
        self.count = 0
        self._last = now
        return True


async def serve_listener(
    listener: SocketListener,
    handler: Handler,
    *,
    max_connections: int,
    task_group: TaskGroup,
    turn_away: Handler | None = None,
) -> None:
    """Accept connections until cancelled, each served by ``handler`` in ``task_group``.

    With ``max_connections`` open, a new connection goes to ``turn_away`` (which must close
    it), or is closed at once when that is None. Transient accept() errors back off and
    retry; any other error ends the loop.
    """
    open_connections = 0
    turning_away = 0
    backoff = BACKOFF_START_S
    accept_failed = Throttled("accept_failed")
    over_cap = Throttled("connections_over_cap")

    async def serve(stream: SocketStream) -> None:
        nonlocal open_connections
        try:
            await handler(stream)
        finally:
            open_connections -= 1

    async def refuse(stream: SocketStream, send_reason: Handler) -> None:
        nonlocal turning_away
        try:
            await send_reason(stream)
        finally:
            turning_away -= 1

    while True:
        try:
            stream = await listener.accept()
        except (anyio.BrokenResourceError, OSError) as exc:
            code = _transient_errno(exc)
            if code is None:
                raise
            accept_failed.note(
                error=errno.errorcode.get(code, str(code)),
                open=open_connections,
                retry_in_s=backoff,
            )
            await anyio.sleep(backoff)
            backoff = next_backoff(backoff)
            continue
        backoff = BACKOFF_START_S
        if open_connections >= max_connections:
            over_cap.note(max_connections=max_connections)
            if turn_away is None or turning_away >= MAX_TURNING_AWAY:
                await stream.aclose()
            else:
                turning_away += 1
                task_group.start_soon(refuse, stream, turn_away)
            continue
        open_connections += 1
        task_group.start_soon(serve, stream)


def _transient_errno(exc: anyio.BrokenResourceError | OSError) -> int | None:
    """The errno of a failed accept() when it is one to wait out, else None."""
    # anyio reports accept()'s OSError as BrokenResourceError caused by it.
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if not isinstance(cause, OSError) or cause.errno not in TRANSIENT_ERRNOS:
        return None
    return cause.errno


async def listen_unix(path: Path, mode: int) -> SocketListener:
    """The msgpack socket at ``path``, bound here; a stale socket file is replaced, a live
    one (another routerd) refused. Raises RuntimeError naming the path."""
    entry = anyio.Path(path)
    try:
        await entry.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if await entry.exists() or await entry.is_symlink():
            if await _socket_in_use(path):
                raise RuntimeError(f"another routerd is already listening on {path}")
            await entry.unlink()
        return UnixListener(bind_unix(path, mode))
    except OSError as exc:
        # `routerd serve` prints a RuntimeError as one line; a bare OSError names no path.
        raise RuntimeError(f"cannot listen on {path}: {exc.strerror or exc}") from exc


async def _socket_in_use(path: Path) -> bool:
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        return False
    await stream.aclose()
    return True

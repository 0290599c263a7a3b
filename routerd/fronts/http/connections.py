"""What the HTTP front keeps per listener and per request beside the HTTP itself: the
connection cap (Gate), a request's Hangup, the scope keys that carry them, and the accept
loop, with one log line per interval for accept() failures and refusals.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog

from routerd.fronts.accepting import BACKOFF_START_S, TRANSIENT_ERRNOS, next_backoff

log = structlog.get_logger("routerd.front")

# A flood repeats the same event thousands of times a second: one line per this long says it.
LOG_INTERVAL_S = 10.0

# The ASGI scope key that names the sender of a request (Dispatcher.chat's fairness key).
CLIENT_KEY = "routerd.client"
# The ASGI scope key of the request's Hangup: how the app learns its client left.
HANGUP_KEY = "routerd.hangup"
# The ASGI scope key of a callable that hands over the whole body when it has all arrived
# (None otherwise): the usual request is read without a timer or a wait.
BODY_KEY = "routerd.body"


class Throttle:
    """Lets one report through per ``interval_s`` and counts the ones it held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next = -math.inf
        self._held = 0

    def admit(self) -> int | None:
        """None to stay quiet; else how many reports were held back since the last one."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval_s
        held, self._held = self._held, 0
        return held


@dataclass(eq=False)
class Gate:
    """The open connections of one kind of listener (Unix or TCP) and their cap."""

    listener: str
    cap: int
    open: int = 0
    refused: int = 0
    throttle: Throttle = field(default_factory=lambda: Throttle(LOG_INTERVAL_S))

    def enter(self) -> bool:
        """Count a new connection in; False (and a rate-limited warning) when at the cap."""
        if self.open >= self.cap:
            self.refused += 1
            held = self.throttle.admit()
            if held is not None:
                log.warning(
                    "http_connection_refused",
                    listener=self.listener,
                    max_connections=self.cap,
                    suppressed=held,
                )
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        """A counted connection closed."""
        self.open -= 1


class Hangup:
    """Cancels the scope a request runs in when its connection is lost.

    ASGI servers do not cancel an app whose client left; they only tell ``receive``, which
    takes a task per request to watch. The protocol sees the loss itself, so it cancels
    the request's scope directly.
    """

    __slots__ = ("_scope", "done", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.done = False
        self._scope: anyio.CancelScope | None = None

    def watch(self, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` when the client goes (at once if it has gone already)."""
        self._scope = scope
        if self.gone:
            scope.cancel()

    def finish(self) -> None:
        """The request is over: a loss after this cancels nothing."""
        self._scope = None
        self.done = True

    def lost(self) -> None:
        """The connection is gone."""
        self.gone = True
        if self._scope is not None:
            self._scope.cancel()


ProtocolFactory = Callable[[], asyncio.Protocol]


async def accept_connections(
    sock: socket.socket, protocol_factory: ProtocolFactory, failures: Throttle
) -> None:
    """Accept on ``sock`` until cancelled, each connection served by a new protocol.

    The front accepts itself rather than through ``loop.create_server``: when descriptors
    run out, asyncio's server reports every retry to the loop's exception handler and
    uvloop's accepts and drops the waiting connections without a word. Here a failed
    accept() backs off while clients wait in the backlog, and says so once per interval.
    """
    loop = asyncio.get_running_loop()
    backoff = BACKOFF_START_S
    while True:
        try:
            client, _ = await loop.sock_accept(sock)
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            held = failures.admit()
            if held is not None:
                log.error(
                    "http_accept_failed",
                    error=str(exc),
                    suppressed=held,
                    hint="out of file descriptors: raise LimitNOFILE or lower "
                    "server.max_connections",
                )
            await anyio.sleep(backoff)
            backoff = next_backoff(backoff)
            continue
        backoff = BACKOFF_START_S
        try:
            if client.family != socket.AF_UNIX:
                # A stream's events go out as small writes: none may wait for an ACK.
                # asyncio's servers set this themselves, its connect_accepted_socket does not.
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(protocol_factory, client)
        except OSError:
            client.close()  # the client left before its transport was made

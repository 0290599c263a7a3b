"""The HTTP front's connections: cap per listener, request-head timeout, peer check, name.

Also the accept loop, with one log line per interval for accept() failures and refusals.
uvicorn has no cap that bounds descriptors (``limit_concurrency`` still accepts every socket
and answers 503 on it, keeping it open) and no timeout for a request head, so both live in a
subclass of its httptools protocol, which sees each connection as it is made. The subclass
goes in through ``uvicorn.Config(http=...)``, uvicorn's documented way to choose the protocol
class; the accept loop hands it each connection (``serve.py`` says why, and what else of
uvicorn's is left out: its signal handlers).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from routerd.fronts.accepting import BACKOFF_START_S, TRANSIENT_ERRNOS, next_backoff
from routerd.fronts.peers import PeerPolicy, peer_of

log = structlog.get_logger("routerd.front")

# A flood repeats the same event thousands of times a second: one line per this long says it.
LOG_INTERVAL_S = 10.0

# The ASGI scope key that names the sender of a request (Dispatcher.chat's fairness key).
CLIENT_KEY = "routerd.client"
# The ASGI scope key of the request's Hangup: how the app learns its client left.
HANGUP_KEY = "routerd.hangup"


def _plain(status: bytes, message: bytes, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 response written before the ASGI app is involved; it closes."""
    head = [
        b"HTTP/1.1 " + status,
        b"content-type: text/plain; charset=utf-8",
        b"content-length: " + str(len(message)).encode(),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + message


_REFUSED = _plain(
    b"503 Service Unavailable",
    b"routerd has server.max_connections connections open on this socket; retry shortly\n",
    b"retry-after: 1",
)
_HEAD_TIMEOUT = _plain(
    b"408 Request Timeout",
    b"the request head did not arrive whole within server.read_timeout_s\n",
)


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


class FrontProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with routerd's connection cap, head timeout and peer check.

    Overriding connection_made/connection_lost/data_received and the parser callbacks
    on_message_begin/on_headers_complete relies on uvicorn's protocol class, not its public
    API: it is the only place that sees a connection before a request exists, which is
    where a descriptor cap and a head timeout must act.
    """

    gate: Gate
    peers: PeerPolicy | None = None
    head_timeout_s: float = 30.0

    _admitted = False
    _head_begun = False
    _head_timer: asyncio.TimerHandle | None = None
    _client: str | None = None
    # The requests of this connection not yet finished (more than one only when pipelined).
    _hangups: list[Hangup] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse past the cap or a peer not allowed; else serve, with the head timer running."""
        super().connection_made(transport)
        if not self.gate.enter():
            # Said before hanging up, so an SDK reads a 503 (which it retries with backoff)
            # rather than a reset; the descriptor is free again as soon as it is written.
            transport.write(_REFUSED)
            transport.close()
            return
        self._admitted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            peer = peer_of(sock)
            if self.peers is not None and not self.peers.allows(peer):
                log.warning("peer_refused", peer=peer, front="http")
                transport.close()
                return
            self._client = f"pid:{peer.pid}" if peer is not None else None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timer and give the connection's place back."""
        self._disarm()
        if self._admitted:
            self._admitted = False
            self.gate.leave()
        for hangup in self._hangups or ():
            hangup.lost()
        self._hangups = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as usual; bytes that arrive while no request is served start the timer."""
        super().data_received(data)
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        if idle and self._head_timer is None and not self.transport.is_closing():
            # A partial head, or the unread rest of a body after its reply: either way no
            # request runs that would end it, so it must end within read_timeout_s.
            self._arm()

    def on_message_begin(self) -> None:
        """A request head begins: note it, name its sender and give it a Hangup."""
        super().on_message_begin()
        self._head_begun = True
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        if self._client is not None:
            scope[CLIENT_KEY] = self._client
        hangup = Hangup()
        scope[HANGUP_KEY] = hangup
        self._hangups = [h for h in self._hangups or () if not h.done]
        self._hangups.append(hangup)

    def on_headers_complete(self) -> None:
        """The head is whole: its timer stops, and the app's body timeout takes over."""
        self._head_begun = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            self.transport.write(_HEAD_TIMEOUT)
        self.transport.close()


def front_protocol(
    gate: Gate, head_timeout_s: float, peers: PeerPolicy | None
) -> type[FrontProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to one listener's gate."""
    attributes = {"gate": gate, "head_timeout_s": head_timeout_s, "peers": peers}
    return type("FrontProtocol", (FrontProtocol,), attributes)


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
        if client.family != socket.AF_UNIX:
            # Replies go out in several writes (head, body): none may wait for an ACK.
            # asyncio's servers set this themselves, its connect_accepted_socket does not.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.connect_accepted_socket(protocol_factory, client)
        except OSError:
            client.close()  # the client left before its transport was made

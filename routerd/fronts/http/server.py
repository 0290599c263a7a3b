"""The HTTP front's HTTP/1.1 server: connections parsed by llhttp (httptools), each request
run by the front's ASGI app in a task of its own.

routerd serves its front itself rather than through uvicorn: a request costs one task and
one write per reply, and what a gateway needs at the connection (the cap, the timeout for a
request head, the peer check, telling a request its client left) lives in one class instead
of a subclass of another server's internals. A Site is one kind of listener (Unix or TCP):
its app, its connection cap and the connections and requests it has open, which its
shutdown lets finish for a grace period and then cancels.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import cast

import anyio
import httptools
import structlog

from routerd.fronts.held import HeldWrites
from routerd.fronts.http.asgi import Receive, Scope, Send
from routerd.fronts.http.connections import CLIENT_KEY, Gate, Hangup
from routerd.fronts.http.exchange import Exchange, plain_response
from routerd.fronts.peers import PeerPolicy, peer_of
from routerd.fronts.tasks import RequestTasks

log = structlog.get_logger("routerd.front")

# Reading pauses while this much of a request body waits for the app to take it.
HIGH_WATER = 64 * 1024
# A request line and headers larger than this are refused (431) before they fill memory.
MAX_HEAD = 64 * 1024

_ASGI = {"version": "3.0", "spec_version": "2.3"}
App = Callable[[Scope, Receive, Send], Awaitable[None]]


_REFUSED = plain_response(
    503,
    b"routerd has server.max_connections connections open on this socket; retry shortly\n",
    b"retry-after: 1",
)
_HEAD_TIMEOUT = plain_response(
    408, b"the request head did not arrive whole within server.read_timeout_s\n"
)
_MALFORMED = plain_response(400, b"malformed HTTP request\n")
_HEAD_TOO_LARGE = plain_response(431, b"the request line and headers exceed 64 KiB\n")


class _HeadTooLarge(Exception):
    pass


class Site:
    """One kind of listener: the app that answers it, its connection cap and timeouts, and
    what it has open."""

    def __init__(
        self,
        app: App,
        gate: Gate,
        *,
        head_timeout_s: float,
        keepalive_s: float,
        peers: PeerPolicy | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.head_timeout_s = head_timeout_s
        self.keepalive_s = keepalive_s
        self.peers = peers
        self.connections: set[HttpConnection] = set()
        self.tasks = RequestTasks()
        self._date = (0, b"")

    def protocol(self) -> HttpConnection:
        """A new connection's protocol (accept_connections' factory)."""
        return HttpConnection(self)

    def date_header(self) -> bytes:
        """The Date header line, rendered once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, b"date: %b\r\n" % formatdate(now, usegmt=True).encode())
        return self._date[1]

    def spawn(self, exchange: Exchange) -> None:
        """Run ``exchange`` in a task of its own (``RequestTasks``), held here until it ends;
        shutdown() awaits and cancels these."""
        self.tasks.spawn(exchange.run())

    async def shutdown(self, graceful_s: float) -> None:
        """Close idle connections, give running requests ``graceful_s`` to finish, then
        cancel what still runs and close every connection."""
        for connection in list(self.connections):
            connection.shutdown()
        with anyio.move_on_after(graceful_s):
            await self.tasks.ended()
        self.abort()
        with anyio.move_on_after(graceful_s, shield=True):
            await self.tasks.ended()

    def abort(self) -> None:
        """Cancel every request and close every connection, now."""
        self.tasks.cancel()
        for connection in list(self.connections):
            connection.close()


class HttpConnection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive and answered in order.

    A pipelined request waits (and reading pauses) until the one before it is answered.
    A connection with no request running must send a whole head within the head timeout,
    and is closed when it stays idle past the keep-alive timeout.
    """

    __slots__ = (
        "_client",
        "_drain",
        "_expect",
        "_head_begun",
        "_head_size",
        "_headers",
        "_idle_timer",
        "_loop",
        "_parser",
        "_paused",
        "_queue",
        "_reading",
        "_serving",
        "_timer",
        "_url",
        "_writes",
        "admitted",
        "site",
        "transport",
        "write_paused",
    )

    def __init__(self, site: Site) -> None:
        self.site = site
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writes: HeldWrites | None = None
        self._paused = False
        self._client: tuple[str | None, tuple[str, int] | None] = (None, None)
        self._reading: Exchange | None = None  # the request being parsed
        self._serving: Exchange | None = None  # the request the app answers
        self._queue: deque[Exchange] = deque()  # pipelined, waiting their turn
        self._timer: asyncio.TimerHandle | None = None
        self._idle_timer = False  # the timer running is the keep-alive one
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_begun = False
        self._expect = False

    # ---- the transport's side ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse past the cap or a peer not allowed; else wait for a head, timed."""
        # uvloop's transports do not subclass asyncio's, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._writes = HeldWrites(transport)
        if not self.site.gate.enter():
            # Said before hanging up, so an SDK reads a 503 (which it retries with backoff)
            # rather than a reset; the descriptor is free again as soon as it is written.
            transport.write(_REFUSED)
            transport.close()
            return
        self.admitted = True
        self.site.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            peer = peer_of(sock)
            if self.site.peers is not None and not self.site.peers.allows(peer):
                log.warning("peer_refused", peer=peer, front="http")
                transport.close()
                return
            self._client = (f"pid:{peer.pid}" if peer is not None else None, None)
        else:
            address = transport.get_extra_info("peername")
            self._client = (None, (str(address[0]), int(address[1])) if address else None)
        self._arm(self.site.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        """End every request of the connection and give its place back."""
        self._disarm()
        if self.admitted:
            self.admitted = False
            self.site.gate.leave()
            self.site.connections.discard(self)
        for exchange in (self._serving, self._reading, *self._queue):
            if exchange is not None and not exchange.complete:
                exchange.lost()
        self._queue.clear()
        self._release_writer()

    def data_received(self, data: bytes) -> None:
        """Parse; bytes that arrive while no request runs must make a head in time."""
        if self._idle_timer:
            self._disarm()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._no_upgrade()
        except httptools.HttpParserCallbackError as exc:
            too_large = isinstance(exc.__context__, _HeadTooLarge)
            self._refuse(_HEAD_TOO_LARGE if too_large else _MALFORMED)
            return
        except httptools.HttpParserError:
            self._refuse(_MALFORMED)
            return
        if self._serving is None and self._timer is None and not self.closing:
            # A partial head, or the unread rest of a body after its reply: either way no
            # request runs that would end it, so it must end within read_timeout_s.
            self._arm(self.site.head_timeout_s)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self._release_writer()

    def _release_writer(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # ---- what exchanges use ------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def drain(self) -> None:
        """Wait until the transport takes writes again (or the connection is lost)."""
        if self._drain is None:
            self._drain = self._loop.create_future()
        await self._drain

    def write(self, data: bytes, *, soon: bool = False) -> None:
        """Into the transport now, after anything held; with ``soon``, held to the end of the
        loop turn, so that a stream's chunks which arrived together leave in one write."""
        if not self.closing:
            assert self._writes is not None
            if soon:
                self._writes.hold(data)
            else:
                self._writes.write(data)

    def close(self) -> None:
        if not self.closing:
            assert self.transport is not None and self._writes is not None
            self._writes.flush()
            self.transport.close()

    def pause_reading(self) -> None:
        if not self._paused and not self.closing:
            assert self.transport is not None
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read on unless a pipelined request waits or a body is still over the mark."""
        if not self._paused or self._queue or self.closing:
            return
        if self._reading is not None and self._reading.buffered > HIGH_WATER:
            return
        assert self.transport is not None
        self._paused = False
        self.transport.resume_reading()

    def finished(self, exchange: Exchange) -> None:
        """``exchange``'s response is complete: the next request's turn, or the idle timer."""
        if not exchange.keep_alive:
            self.close()
            return
        self._serving = None
        if self.closing:
            return
        if self._queue:
            self._start(self._queue.popleft())
            return
        self.resume_reading()
        self._arm(self.site.keepalive_s, idle=True)

    def shutdown(self) -> None:
        """The front stops: close now if idle, else after the response running."""
        if self._serving is None:
            self.close()
            return
        for exchange in (self._serving, self._reading, *self._queue):
            if exchange is not None:
                exchange.keep_alive = False

    # ---- the parser's callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_begun = True
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        self._headers.append((name, value))

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        """The head is whole: its timer stops and the request is served (or waits its turn)."""
        self._disarm()
        self._head_begun = False
        parser = self._parser
        version = parser.get_http_version()
        exchange = Exchange(
            self,
            self._scope(parser.get_method().decode("ascii"), version),
            keep_alive=version == "1.1" and parser.should_keep_alive(),
            expect_continue=self._expect,
            hangup=Hangup(),
        )
        self._reading = exchange
        if self._serving is None:
            self._start(exchange)
        else:
            self._queue.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._reading
        if exchange is None or exchange.complete:
            return  # the rest of a body its response did not wait for
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self._reading
        self._reading = None
        if exchange is not None and not exchange.complete:
            exchange.more_body = False
            exchange.wake()

    # ---- inside ------------------------------------------------------------------------

    def _scope(self, method: str, version: str) -> Scope:
        url = httptools.parse_url(self._url)
        raw_path: bytes = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = urllib.parse.unquote(path)
        named, address = self._client
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "scheme": "http",
            "method": method,
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "root_path": "",
            "headers": self._headers,
            "client": address,
            "server": None,
        }
        if named is not None:
            scope[CLIENT_KEY] = named
        return scope

    def _start(self, exchange: Exchange) -> None:
        self._serving = exchange
        self.site.spawn(exchange)

    def _no_upgrade(self) -> None:
        """No upgrade (nor CONNECT) is served: the request is answered as it is, with no
        body, and the connection closes after it."""
        exchange, self._reading = self._reading, None
        if exchange is not None and not exchange.complete:
            exchange.more_body = False
            exchange.wake()
        for waiting in (self._serving, exchange, *self._queue):
            if waiting is not None:
                waiting.keep_alive = False
        self.pause_reading()

    def _refuse(self, response: bytes) -> None:
        """Answer a head that cannot be served, unless a request runs; then close."""
        if self._serving is None:
            self.write(response)
        self.close()

    def _arm(self, delay_s: float, *, idle: bool = False) -> None:
        self._disarm()
        self._idle_timer = idle
        self._timer = self._loop.call_later(delay_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle_timer = False

    def _timed_out(self) -> None:
        self._timer = None
        if self.closing:
            return
        if self._head_begun:
            self.write(_HEAD_TIMEOUT)
        self.close()

"""The daemon's one upstream HTTP client: a keep-alive HTTP/1.1 connection pool every provider
call goes through.

Its own, on asyncio's transports and llhttp's parser (``connection.py``), because aiohttp's
client exchange was about 35% of the daemon's busy time per request. The adapters need a
POST, its status, its headers and its body or lines, and nothing more, so this leaves out
what an HTTP library adds above that: cookies (a cookie a provider set for one key must
never ride along on another key's call), redirects (following a 307 would send the key to
wherever it points), HTTP/2 (every provider speaks HTTP/1.1, and one connection per call in
flight is what the pool's cap counts) and asking for compression (a reply is small or
streamed; gzip or deflate sent anyway is decoded). An http:// proxy named by the
environment (``proxy.py``) is dialled instead of the target: a CONNECT tunnel for https://,
the request in absolute form for http://. A host's addresses are raced (``eyeballs.py``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from routerd.upstream.connection import Connection, Key
from routerd.upstream.eyeballs import Address, Connect, first_connected, resolve
from routerd.upstream.proxy import Proxies, Proxy
from routerd.upstream.tunnel import open_tunnel
from routerd.upstream.wire import (
    ConnectError,
    ConnectTimeout,
    Endpoint,
    NetworkError,
    parse_endpoint,
)

__all__ = ["CONNECT_S", "KEEPALIVE_S", "Pool", "Proxies", "Response", "UpstreamSession"]

# An idle connection is not reused after this long: below the shortest idle timeout servers
# commonly use (uvicorn's and Node's 5 s), so routerd never sends on a connection the
# server is closing. At 5 s the two raced: a breaker's probe after 5 quiet seconds could
# meet "server disconnected", fail, and keep the target open twice as long.
KEEPALIVE_S = 4.0
# Connecting should take milliseconds; a long connect wait only delays the fallback.
CONNECT_S = 5.0

ConnectTo = Callable[[str, int], tuple[str, int]]
# A host's addresses to connect to, in the order to try them (eyeballs.resolve).
Resolve = Callable[[str, int], Awaitable[list[Address]]]


class Response:
    """A reply whose status and headers have arrived; its body is read from ``conn``.

    ``release`` must follow, whatever happened: the connection goes back to the pool if the
    reply came whole and the server keeps it open, and is closed otherwise.
    """

    __slots__ = ("_pool", "conn", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], conn: Connection, pool: Pool):
        self.status = status
        self.headers = headers
        self.conn = conn
        self._pool: Pool | None = pool

    def release(self) -> None:
        """Hand the connection back (or close it); idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self.conn)


class Pool:
    """Open connections keyed by (scheme, host, port), at most ``max_connections`` in all.

    Idle ones are reused newest first and closed once idle for ``keepalive_s``; a caller
    finding every slot taken waits for one, first come first served.
    """

    def __init__(
        self,
        max_connections: int,
        keepalive_s: float,
        connect_to: ConnectTo | None = None,
        tls: ssl.SSLContext | None = None,
        proxies: Proxies | None = None,
        resolve: Resolve = resolve,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.open = 0  # connecting, in use or idle
        self.in_use: set[Connection] = set()
        self._connect_to = connect_to
        self._resolve = resolve
        self._proxies = proxies or Proxies()
        self._proxy_of: dict[Key, Proxy | None] = {}  # each target's, looked up once
        self._loop = asyncio.get_running_loop()
        self._idle: dict[Key, list[Connection]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._tls = tls
        self._closed = False

    def idle_count(self) -> int:
        """How many connections wait idle for a call."""
        return sum(len(idle) for idle in self._idle.values())

    async def acquire(self, endpoint: Endpoint, connect_s: float) -> Connection:
        """A connection to ``endpoint``: an idle one, else a new one once a slot is free."""
        first = False
        while True:
            if self._closed:
                raise NetworkError("the upstream session is closed")
            conn = self._pop_idle(endpoint.key)
            if conn is not None:
                self.in_use.add(conn)
                return conn
            if self.open < self.max_connections or self._evict():
                return await self._connect(endpoint, connect_s)
            await self._wait_for_slot(first)
            first = True  # woken but beaten to it: first in line next time

    def release(self, conn: Connection) -> None:
        """Take back a connection whose exchange is over."""
        if conn not in self.in_use:
            return
        self.in_use.discard(conn)
        if self._closed or not conn.detach():
            conn.close()
            return
        conn.idle = True
        conn.idle_since = self._loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = self._loop.call_at(conn.idle_since + self.keepalive_s, self._expire)
        self._wake_one()

    async def aclose(self) -> None:
        """Close every connection, idle or in use, and fail the callers waiting for one."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in [*self.in_use, *(c for idle in self._idle.values() for c in idle)]:
            conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # the transports close their sockets on the next loop pass

    def _pop_idle(self, key: Key) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        conn = idle.pop()
        if self._loop.time() - conn.idle_since < self.keepalive_s:
            conn.idle = False
            return conn
        # Newest first, so every one under it has been idle longer still.
        idle.append(conn)
        for old in [*idle]:
            old.close()
        return None

    def _evict(self) -> bool:
        # Every slot is taken but some are idle connections to other hosts: the one idle
        # longest makes room, or a call to a new host would wait on a pool full of nothing.
        oldest = min(
            (idle[0] for idle in self._idle.values() if idle),
            key=lambda conn: conn.idle_since,
            default=None,
        )
        if oldest is None:
            return False
        oldest.close()
        return True

    async def _connect(self, endpoint: Endpoint, connect_s: float) -> Connection:
        self.open += 1
        proxy = self._proxy_for(endpoint)
        host, port = (endpoint.host, endpoint.port) if proxy is None else (proxy.host, proxy.port)
        mapped = self._connect_to(host, port) if self._connect_to is not None else None
        tls = self._context() if endpoint.tls else None
        where = f"{endpoint.host}:{endpoint.port}"
        if proxy is not None:
            where += f" through the proxy {proxy.where}"
        try:
            async with asyncio.timeout(connect_s):
                addresses = [mapped] if mapped is not None else await self._resolve(host, port)
                conn = await first_connected(addresses, self._dialler(endpoint, proxy, tls), _close)
                if proxy is not None and tls is None:  # plain HTTP: the target named whole
                    conn.request_head = proxy.absolute_head(endpoint)
        except BaseException as exc:
            self.open -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"connecting to {where} took over {connect_s:g}s") from None
            if isinstance(exc, OSError | ValueError | ConnectError):
                raise ConnectError(f"cannot connect to {where}: {exc}") from None
            raise
        conn.on_closed = self._lost
        self.in_use.add(conn)
        return conn

    def _dialler(
        self, endpoint: Endpoint, proxy: Proxy | None, tls: ssl.SSLContext | None
    ) -> Connect[Connection]:
        """What connects to one address: a tunnel through the proxy for https://, else the
        target (or for http://, the proxy) itself, over TLS when the target is https://."""
        if proxy is not None and tls is not None:
            return lambda address: open_tunnel(proxy, endpoint, *address, tls)

        async def direct(address: Address) -> Connection:
            _, conn = await self._loop.create_connection(
                lambda: Connection(endpoint.key),
                *address,
                ssl=tls,
                server_hostname=endpoint.host if tls is not None else None,
            )
            return conn

        return direct

    def _proxy_for(self, endpoint: Endpoint) -> Proxy | None:
        if not self._proxies:
            return None
        key = endpoint.key
        if key not in self._proxy_of:
            self._proxy_of[key] = self._proxies.for_endpoint(endpoint)
        return self._proxy_of[key]

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # loading the CA store takes milliseconds
        return self._tls

    def _lost(self, conn: Connection) -> None:
        self.open -= 1
        self.in_use.discard(conn)
        if conn.idle:
            conn.idle = False
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)
        self._wake_one()

    def _expire(self) -> None:
        self._sweep = None
        now = self._loop.time()
        oldest: float | None = None
        for key, idle in [*self._idle.items()]:
            for conn in [c for c in idle if now - c.idle_since >= self.keepalive_s]:
                conn.close()
            if idle:
                oldest = idle[0].idle_since if oldest is None else min(oldest, idle[0].idle_since)
            else:
                del self._idle[key]
        if oldest is not None:
            self._sweep = self._loop.call_at(oldest + self.keepalive_s, self._expire)

    async def _wait_for_slot(self, first: bool) -> None:
        waiter = self._loop.create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken and cancelled at once: the slot goes to the next
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class UpstreamSession:
    """The pool, capped at ``max_connections`` open connections across all providers.

    It is made on first use, inside the event loop that serves the calls, and closed by
    ``async with``. ``connect_to`` maps a URL's (host, port) to the address to dial instead
    (the adapter tests point every host at a server on loopback); ``tls`` replaces the
    default TLS context (a private certificate authority; the client's tests).
    """

    __slots__ = (
        "_connect_to",
        "_keepalive_s",
        "_max_connections",
        "_pool",
        "_proxies",
        "_resolve",
        "_tls",
    )

    def __init__(
        self,
        max_connections: int,
        *,
        connect_to: ConnectTo | None = None,
        keepalive_s: float = KEEPALIVE_S,
        tls: ssl.SSLContext | None = None,
        proxies: Proxies | None = None,
        resolve: Resolve = resolve,
    ) -> None:
        self._max_connections = max_connections
        self._connect_to = connect_to
        self._keepalive_s = keepalive_s
        self._tls = tls
        self._proxies = proxies or Proxies()
        self._resolve = resolve
        self._pool: Pool | None = None

    def pool(self) -> Pool:
        """The pool, made on the first call."""
        pool = self._pool
        if pool is None:
            pool = self._pool = Pool(
                self._max_connections,
                self._keepalive_s,
                self._connect_to,
                self._tls,
                self._proxies,
                self._resolve,
            )
        return pool

    async def request(
        self,
        url: Endpoint | str,
        content: bytes,
        headers: dict[str, str],
        read_s: float,
        connect_s: float = CONNECT_S,
    ) -> Response:
        """POST ``content`` and return once the reply's head has arrived.

        ``read_s`` bounds each wait for data, ``connect_s`` connecting (at most ``read_s``).
        Raises the errors of ``routerd.upstream.wire``, and RefusedHeader before anything is
        sent.
        """
        endpoint = url if isinstance(url, Endpoint) else parse_endpoint(url)
        data = endpoint.request(content, headers)
        pool = self.pool()
        conn = await pool.acquire(endpoint, min(connect_s, read_s))
        if conn.request_head is not None:  # through a proxy, in absolute form
            data = _rehead(data, len(endpoint.head), conn.request_head)
        try:
            conn.send(data, read_s)
            status, head = await conn.head()
        except BaseException:
            pool.release(conn)  # the reply did not come whole: closed, its slot freed
            raise
        return Response(status, head, conn, pool)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _rehead(data: bytes | list[bytes], cut: int, head: bytes) -> bytes | list[bytes]:
    """The request ``data`` with its first ``cut`` bytes (request line, Host) as ``head``."""
    if isinstance(data, list):
        return [head + data[0][cut:], *data[1:]]
    return head + data[cut:]


def _close(conn: Connection) -> None:
    conn.close()

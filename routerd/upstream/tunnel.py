"""A CONNECT tunnel through an HTTP proxy, then TLS to the target inside it.

The proxy's reply to CONNECT is parsed with llhttp (httptools), as every reply is; a 2xx
opens the tunnel and anything else is a ConnectError with the status it gave (407: its
credentials, 403: its policy), which the pool prefixes with the target and the proxy. TLS
then runs end to end with the target, verified against the target's name: the proxy
relays bytes it cannot read.
"""

from __future__ import annotations

import asyncio
import ssl

import httptools

from routerd.upstream.connection import Connection
from routerd.upstream.proxy import Proxy
from routerd.upstream.wire import ConnectError, Endpoint

__all__ = ["open_tunnel"]

# A reply to CONNECT is a status line and a few headers; more than this is not one.
HEAD_MAX = 16 * 1024


class _Handshake(asyncio.Protocol):
    """Reads the proxy's reply to CONNECT; ``answered`` is done once its head is whole."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[int] = loop.create_future()
        self.reason = b""
        # Bytes came after the reply's head: the target speaks only once TLS begins, which
        # this end starts, so they are not the target's, and the tunnel is not used.
        self.extra = False
        self._parser = httptools.HttpResponseParser(self)
        self._seen = 0

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            self.extra = True
            return
        self._seen += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # a reply that says Upgrade: llhttp stops after its head, all that is read
        except httptools.HttpParserError as exc:
            self._fail(f"the proxy's reply to CONNECT is not HTTP: {exc}")
            return
        if not self.answered.done() and self._seen > HEAD_MAX:
            self._fail(f"the proxy's reply to CONNECT exceeds {HEAD_MAX} bytes")

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_body(self, body: bytes) -> None:
        self.extra = True

    def on_headers_complete(self) -> None:
        if not self.answered.done():
            self.answered.set_result(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("the proxy closed the connection before answering CONNECT")

    def _fail(self, message: str) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectError(message))


async def open_tunnel(
    proxy: Proxy, endpoint: Endpoint, host: str, port: int, tls: ssl.SSLContext
) -> Connection:
    """A connection to ``endpoint`` through ``proxy`` (dialled at ``host``:``port``): CONNECT,
    then TLS with the target inside the tunnel. Raises ConnectError or OSError."""
    loop = asyncio.get_running_loop()
    transport, handshake = await loop.create_connection(_Handshake, host, port)
    try:
        transport.write(proxy.connect_request(endpoint))
        status = await handshake.answered
        if not 200 <= status < 300:
            reason = handshake.reason.decode("latin-1", "replace")[:80]
            raise ConnectError(f"the proxy refused the tunnel: {status} {reason}".rstrip())
        if handshake.extra:
            raise ConnectError("the proxy sent bytes after its reply to CONNECT")
        conn = Connection(endpoint.key)
        secured = await loop.start_tls(transport, conn, tls, server_hostname=endpoint.host)
        if secured is None:  # the transport closed under the handshake
            raise ConnectError("the proxy closed the tunnel during TLS")
    except BaseException:
        transport.close()
        raise
    conn.connection_made(secured)
    return conn

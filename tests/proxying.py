"""An HTTP forward proxy on loopback for the proxy tests: CONNECT tunnels and absolute-form
requests, the names it is asked for resolved from its own table (as a real proxy resolves
them in its own network), every request line and Proxy-Authorization it saw recorded."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from tests.streamserver import StreamServer


class ForwardProxy(StreamServer):
    """``routes`` maps "host:port" as a client names it to the loopback port that serves it.
    ``refuse``: bytes to answer every request with instead (a 407, say), then close, or with
    ``stall`` keep the connection open and say nothing more."""

    def __init__(
        self, routes: dict[str, int], refuse: bytes | None = None, *, stall: bool = False
    ) -> None:
        super().__init__()
        self.routes = routes
        self.refuse = refuse
        self.stall = stall
        self.lines: list[str] = []  # each connection's first request line
        self.authorizations: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            self.lines.append(lines[0].decode())
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"proxy-authorization":
                    self.authorizations.append(value.strip().decode())
            if self.refuse is not None:
                writer.write(self.refuse)
                await writer.drain()
                if self.stall:
                    await asyncio.Event().wait()  # until stop() cancels it
                return
            method, target, _ = lines[0].split(b" ")
            connect = method == b"CONNECT"
            authority = target.decode() if connect else urlsplit(target.decode()).netloc
            port = self.routes.get(authority)
            if port is None:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", port)
            if connect:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.write(head)  # absolute form, as it came: servers must accept it
            await asyncio.gather(_copy(reader, upstream), _copy(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for end in (upstream, writer):
                if end is not None:
                    end.transport.abort()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()

"""A real HTTP server on loopback for the adapter tests, and the upstream session that reaches it.

Handlers are written against httpx's Request and Response (a compact way to say what a
provider answers); the server is aiohttp's, on 127.0.0.1, and every host name the adapter
asks for is dialled there instead, so the adapters run their real upstream exchange. A
handler can also answer with a transport fault: ``Disconnect`` (the connection dropped
before a reply), a body that raises mid-way (the connection is cut there) or one that hangs.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
import httpx
from aiohttp import web

from routerd.upstream.session import KEEPALIVE_S, UpstreamSession

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


class Disconnect(Exception):
    """Raised by a handler: the server drops the connection without a reply."""


def _to_loopback(port: int) -> Callable[[str, int], tuple[str, int]]:
    """Every host name to the server; an address stays itself, as with a real resolver (so
    a closed port on 127.0.0.1 is still refused)."""

    def connect_to(host: str, original: int) -> tuple[str, int]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return "127.0.0.1", port
        return host, original

    return connect_to


class Loopback:
    """One server; ``handler`` answers the next requests. ``peers`` records the client's
    address of each request, so a test can see a connection reused."""

    def __init__(
        self, *, server_keepalive_s: float = 75.0, client_keepalive_s: float | None = None
    ) -> None:
        self.server_keepalive_s = server_keepalive_s
        self.client_keepalive_s = client_keepalive_s
        self.handler: Handler | None = None
        self.peers: list[Any] = []
        self.session: UpstreamSession | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        server = web.Server(
            self._handle, handler_cancellation=True, keepalive_timeout=self.server_keepalive_s
        )
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        keepalive_s = KEEPALIVE_S if self.client_keepalive_s is None else self.client_keepalive_s
        self.session = UpstreamSession(16, connect_to=_to_loopback(port), keepalive_s=keepalive_s)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.aclose()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self.handler is not None, "no handler set"
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        seen = httpx.Request(
            request.method,
            str(request.url),
            headers=list(request.headers.items()),
            content=await request.read(),
        )
        try:
            response = await self.handler(seen)
        except Disconnect:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError from None
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ("content-length", "transfer-encoding")
        ]
        stream = response.stream
        if isinstance(stream, httpx.ByteStream) or not isinstance(stream, httpx.AsyncByteStream):
            return web.Response(status=response.status_code, headers=headers, body=response.read())
        return await _stream(request, response.status_code, headers, stream)


async def _stream(
    request: web.BaseRequest,
    status: int,
    headers: list[tuple[str, str]],
    body: httpx.AsyncByteStream,
) -> web.StreamResponse:
    out = web.StreamResponse(status=status, headers=headers)
    await out.prepare(request)
    try:
        try:
            async for part in body:
                await out.write(part)
        except Exception:
            # The body's fault: the connection is cut here, mid-reply.
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError from None
        await out.write_eof()
        return out
    finally:
        await body.aclose()


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait for what the server does after the client has moved on (it runs in parallel)."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - set by the server side, which has no event
            await anyio.sleep(0.01)


async def serve(**options: float) -> AsyncIterator[Loopback]:
    """The body of a fixture: one started server per test."""
    loopback = Loopback(**options)
    await loopback.start()
    try:
        yield loopback
    finally:
        await loopback.stop()


# The servers of the tests running now; the newest is the current test's (``upstream``).
SERVING: list[Loopback] = []


def answering(handler: Handler) -> UpstreamSession:
    """The current test's session, its server now answering with ``handler``."""
    loopback = SERVING[-1]
    loopback.handler = handler
    assert loopback.session is not None
    return loopback.session

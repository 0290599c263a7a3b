"""The daemon's one upstream HTTP client: an aiohttp session every provider call goes through.

aiohttp's connection pool and C HTTP parser, used directly: the adapters need a POST, its
status, its headers and its body or lines, and nothing an HTTP library adds above that
(cookies, redirects, request objects for hooks). Wrapping aiohttp in httpx's request and
response objects had cost a fifth of the daemon's time per request.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aiohttp
from aiohttp.abc import AbstractResolver

__all__ = ["UpstreamSession"]

# An idle connection is not reused after this long: below the shortest idle timeout servers
# commonly use (uvicorn's and Node's 5 s), so routerd never sends on a connection the
# server is closing. At 5 s the two raced: a breaker's probe after 5 quiet seconds could
# meet "server disconnected", fail, and keep the target open twice as long.
KEEPALIVE_S = 4.0


class UpstreamSession:
    """The session, capped at ``max_connections`` open connections across all providers.

    It is made on first use, inside the event loop that serves the calls, and closed by
    ``async with``. ``resolver`` replaces DNS (the adapter tests point every host at a
    server on loopback).
    """

    __slots__ = ("_keepalive_s", "_max_connections", "_resolver", "_session")

    def __init__(
        self,
        max_connections: int,
        *,
        resolver: AbstractResolver | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self._max_connections = max_connections
        self._resolver = resolver
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        """The session, made on the first call."""
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                resolver=self._resolver,
            )
            # No cookies: an API call carries its credentials in its headers, and a cookie a
            # provider set for one key must never ride along on another key's call.
            session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._session = session
        return session

    async def aclose(self) -> None:
        """Close the pool's connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

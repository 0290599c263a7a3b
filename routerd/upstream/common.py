"""What every upstream adapter shares: the POST, the streamed POST, their timeouts and the one
translation of transport errors (aiohttp's, from ``routerd.upstream.session``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from routerd.core.calls import Call
from routerd.core.classify import transport_failure
from routerd.core.outcome import Failure, UpstreamFailure
from routerd.upstream.session import UpstreamSession
from routerd.upstream.sse import LineSplitter, SSEDecoder

__all__ = [
    "HTTP_ERRORS",
    "Answer",
    "Streamed",
    "endpoint",
    "open_stream",
    "post",
    "sse_events",
    "translate_http_error",
]

# Everything a failed exchange raises: aiohttp's errors and a timeout from beneath them.
HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# Most specific first: the first match names the failure.
_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (aiohttp.InvalidURL, "invalid url"),
    (aiohttp.ConnectionTimeoutError, "connect timeout"),
    (aiohttp.SocketTimeoutError, "read timeout"),
    (aiohttp.ServerTimeoutError, "timeout"),
    (aiohttp.ClientProxyConnectionError, "proxy error"),
    (aiohttp.ClientConnectorError, "connect error"),
    (aiohttp.ServerDisconnectedError, "protocol error"),
    (aiohttp.ClientPayloadError, "protocol error"),
    (aiohttp.ClientResponseError, "protocol error"),
    (aiohttp.ClientOSError, "read error"),
    (aiohttp.ClientConnectionError, "network error"),
    (asyncio.TimeoutError, "timeout"),
)


class Answer:
    """A whole upstream reply: its status, its headers (lower-case names) and its body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


class Streamed:
    """A successful upstream reply being streamed: status, headers, then its lines."""

    __slots__ = ("_content", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = header_map(response)
        self._content = response.content

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines without their endings, as they arrive, however long."""
        splitter = LineSplitter()
        async for chunk in self._content.iter_any():
            for line in splitter.feed(chunk):
                yield line
        for line in splitter.flush():
            yield line


@lru_cache(maxsize=256)
def endpoint(base_url: str, path: str) -> URL | str:
    """The URL of ``path`` under ``base_url``, parsed once. A URL that cannot be parsed comes
    back as the string, so the request fails with aiohttp's InvalidURL, as target_down."""
    url = f"{base_url.rstrip('/')}/{path}"
    try:
        return URL(url)
    except ValueError:
        return url


@lru_cache(maxsize=64)
def timeout(seconds: float) -> aiohttp.ClientTimeout:
    """The timeout of one attempt: ``seconds`` for each read, short for connecting. Shared
    between requests: never changed."""
    # Connecting should take milliseconds; a long connect wait only delays the fallback.
    return aiohttp.ClientTimeout(total=None, sock_connect=min(5.0, seconds), sock_read=seconds)


def header_map(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The response's headers as a plain dict with lower-case names, built once (reading the
    rate-limit headers takes a dozen lookups). A repeated header keeps its last value."""
    headers: CIMultiDictProxy[str] = response.headers
    return {name.lower(): value for name, value in headers.items()}


def translate_http_error(exc: Exception, call: Call, *, streaming: bool = False) -> Failure:
    """The one translation of a transport error into a target_down Failure."""
    kind = next((name for cls, name in _KINDS if isinstance(exc, cls)), "http error")
    if "timeout" in kind:
        limit = min(5.0, call.timeout) if kind == "connect timeout" else call.timeout
        kind = f"{kind} after {limit:g}s"
    if streaming:
        kind = f"stream cut ({kind})"
    return transport_failure(kind, str(exc), key=call.key)


def _refused_header(exc: ValueError, call: Call) -> Failure:
    # aiohttp refuses a header value with a line break (a key file that kept its newline)
    # before anything is sent; the message is scrubbed of the key like every other.
    return transport_failure("local protocol error", str(exc), key=call.key)


async def post(
    session: UpstreamSession,
    call: Call,
    url: URL | str,
    content: bytes,
    headers: dict[str, str],
) -> Answer:
    """POST a whole request and read its reply; a transport failure is raised as UpstreamFailure."""
    failure: Failure
    try:
        async with session.get().post(
            url,
            data=content,
            headers=headers,
            timeout=timeout(call.timeout),
            allow_redirects=False,
        ) as response:
            body = await response.read()
            return Answer(response.status, header_map(response), body)
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    except ValueError as exc:
        failure = _refused_header(exc, call)
    # Raised outside the except block so aiohttp's exception is not chained onto it.
    raise UpstreamFailure(failure)


@asynccontextmanager
async def open_stream(
    session: UpstreamSession,
    call: Call,
    url: URL | str,
    content: bytes,
    headers: dict[str, str],
    classify_error: Callable[[int, dict[str, str], bytes | None], Failure],
) -> AsyncIterator[Streamed]:
    """Open a streamed POST and yield it once the status says success.

    An error status (classified from its body) or a transport failure before that point
    is raised as UpstreamFailure: nothing has reached the client yet, so it can fall back.
    Leaving the block releases the connection: back to the pool when the body was read to
    its end, closed otherwise (a cancelled or abandoned stream).
    """
    failure: Failure
    try:
        response = await session.get().post(
            url,
            data=content,
            headers=headers,
            timeout=timeout(call.timeout),
            allow_redirects=False,
        )
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    except ValueError as exc:
        failure = _refused_header(exc, call)
    else:
        try:
            if 200 <= response.status < 300:
                yield Streamed(response)
                return
            body: bytes | None
            try:
                body = await response.read()
            except HTTP_ERRORS:
                body = None  # the status alone still classifies it
            failure = classify_error(response.status, header_map(response), body)
        finally:
            if response.content.at_eof():
                response.release()  # read to its end: the connection goes back to the pool
            else:
                response.close()
    raise UpstreamFailure(failure)


async def sse_events(stream: Streamed, call: Call) -> AsyncIterator[tuple[str | None, str]]:
    """The (event, data) pairs of a streamed response, to its end.

    A transport error on the way (a cut, a timeout) is raised as UpstreamFailure.
    """
    decoder = SSEDecoder()
    failure: Failure | None = None
    try:
        async for line in stream.lines():
            event = decoder.feed(line)
            if event is not None:
                yield event
        event = decoder.flush()
        if event is not None:
            yield event
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call, streaming=True)
    # Raised outside the except block so aiohttp's exception is not chained onto it.
    if failure is not None:
        raise UpstreamFailure(failure)

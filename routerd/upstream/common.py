"""What every upstream adapter shares: its httpx timeout and the one translation of transport
errors, httpx's and those of aiohttp beneath it (``build.upstream_client``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache

import aiohttp
import httpx

from routerd.core.calls import Call
from routerd.core.classify import transport_failure
from routerd.core.outcome import Failure, UpstreamFailure
from routerd.upstream.sse import SSEDecoder

# Everything a failed exchange can raise: httpx's errors (InvalidURL is not an HTTPError), and
# aiohttp's that its httpx transport passes through unmapped (a malformed response, say).
HTTP_ERRORS = (httpx.HTTPError, httpx.InvalidURL, aiohttp.ClientError, asyncio.TimeoutError)
# The httpx transport maps aiohttp's errors coarsely (a reset becomes ConnectTimeout); the
# aiohttp error it was raised from names the failure. Most specific first.
_AIOHTTP_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (aiohttp.ConnectionTimeoutError, "connect timeout"),
    (aiohttp.SocketTimeoutError, "read timeout"),
    (aiohttp.ServerTimeoutError, "timeout"),
    (aiohttp.ClientConnectorError, "connect error"),
    (aiohttp.ServerDisconnectedError, "protocol error"),
    (aiohttp.ClientPayloadError, "protocol error"),
    (aiohttp.ClientResponseError, "protocol error"),
    (aiohttp.ClientOSError, "read error"),
    (aiohttp.ClientConnectionError, "network error"),
    (asyncio.TimeoutError, "timeout"),
)
# Most specific first: the first match names the failure.
_TRANSPORT_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (httpx.ConnectTimeout, "connect timeout"),
    (httpx.ReadTimeout, "read timeout"),
    (httpx.WriteTimeout, "write timeout"),
    (httpx.PoolTimeout, "local connection pool timeout"),
    (httpx.TimeoutException, "timeout"),
    (httpx.ConnectError, "connect error"),
    (httpx.RemoteProtocolError, "protocol error"),
    (httpx.LocalProtocolError, "local protocol error"),
    (httpx.ReadError, "read error"),
    (httpx.WriteError, "write error"),
    (httpx.ProxyError, "proxy error"),
    (httpx.UnsupportedProtocol, "unsupported protocol"),
    (httpx.NetworkError, "network error"),
    (httpx.DecodingError, "decoding error"),
    (httpx.TooManyRedirects, "too many redirects"),
    (httpx.InvalidURL, "invalid url"),
)


@lru_cache(maxsize=256)
def endpoint(base_url: str, path: str) -> httpx.URL | str:
    """The URL of ``path`` under ``base_url``, parsed once (httpx's parser is pure Python
    and would otherwise run on every request). A URL httpx cannot parse comes back as the
    string, so the request raises InvalidURL where transport errors are translated."""
    url = f"{base_url.rstrip('/')}/{path}"
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        return url


@lru_cache(maxsize=64)
def timeout(seconds: float) -> dict[str, float | None]:
    """The timeout of one attempt, as a transport reads it: ``seconds`` for each read, short
    for connecting. Shared between requests: never changed."""
    # Connecting should take milliseconds; a long connect wait only delays the fallback.
    return httpx.Timeout(seconds, connect=min(5.0, seconds)).as_dict()


def _request(
    call: Call, url: httpx.URL | str, content: bytes, headers: dict[str, str]
) -> httpx.Request:
    return httpx.Request(
        "POST", url, content=content, headers=headers, extensions={"timeout": timeout(call.timeout)}
    )


def header_map(response: httpx.Response) -> dict[str, str]:
    """The response's headers as a plain dict with lower-case names, built once.

    httpx's Headers decodes and scans every raw header on each lookup, and reading the
    rate-limit headers takes a dozen. A repeated header keeps its last value.
    """
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in response.headers.raw
    }


def translate_http_error(exc: Exception, call: Call, *, streaming: bool = False) -> Failure:
    """The one translation of an httpx exception into a target_down Failure."""
    kind = _kind(exc)
    if "timeout" in kind:
        limit = min(5.0, call.timeout) if kind == "connect timeout" else call.timeout
        kind = f"{kind} after {limit:g}s"
    if streaming:
        kind = f"stream cut ({kind})"
    return transport_failure(kind, str(exc), key=call.key)


def _kind(exc: Exception) -> str:
    cause = exc if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError) else exc.__cause__
    if isinstance(cause, aiohttp.ClientError | asyncio.TimeoutError):
        return next(name for cls, name in _AIOHTTP_KINDS if isinstance(cause, cls))
    return next((name for cls, name in _TRANSPORT_KINDS if isinstance(exc, cls)), "http error")


async def sse_events(response: httpx.Response, call: Call) -> AsyncIterator[tuple[str | None, str]]:
    """The (event, data) pairs of a streamed response, to its end.

    An httpx error on the way (a cut, a timeout) is raised as UpstreamFailure.
    """
    decoder = SSEDecoder()
    failure: Failure | None = None
    try:
        async for line in response.aiter_lines():
            event = decoder.feed(line)
            if event is not None:
                yield event
        event = decoder.flush()
        if event is not None:
            yield event
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call, streaming=True)
    # Raised outside the except block so the httpx exception is not chained onto it.
    if failure is not None:
        raise UpstreamFailure(failure)


async def post(
    http: httpx.AsyncBaseTransport,
    call: Call,
    url: httpx.URL | str,
    content: bytes,
    headers: dict[str, str],
) -> httpx.Response:
    """POST a whole request and read its reply; a transport failure is raised as UpstreamFailure.

    Straight to the transport: an httpx client would add cookies, auth and redirects, none
    of which an API call uses, at a cost that was a third of the daemon's time per request.
    """
    failure: Failure | None = None
    try:
        response = await http.handle_async_request(_request(call, url, content, headers))
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    raise UpstreamFailure(failure)


@asynccontextmanager
async def open_stream(
    http: httpx.AsyncBaseTransport,
    call: Call,
    url: httpx.URL | str,
    content: bytes,
    headers: dict[str, str],
    classify_error: Callable[[httpx.Response, bytes | None], Failure],
) -> AsyncIterator[httpx.Response]:
    """Open a streamed POST and yield its response once the status says success.

    An error status (classified from its body) or a transport failure before that point
    is raised as UpstreamFailure: nothing has reached the client yet, so it can fall back.
    """
    failure: Failure | None = None
    try:
        response = await http.handle_async_request(_request(call, url, content, headers))
        try:
            if response.is_success:
                yield response
                return
            body: bytes | None
            try:
                body = await response.aread()
            except HTTP_ERRORS:
                body = None  # the status alone still classifies it
            failure = classify_error(response, body)
        finally:
            await response.aclose()
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    raise UpstreamFailure(failure)

"""What every upstream adapter shares: its httpx timeout and the one translation of httpx errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache

import httpx

from routerd.core.calls import Call
from routerd.core.classify import transport_failure
from routerd.core.outcome import Failure, UpstreamFailure
from routerd.upstream.sse import SSEDecoder

# Everything httpx can raise for a failed exchange (InvalidURL is not an HTTPError).
HTTP_ERRORS = (httpx.HTTPError, httpx.InvalidURL)
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
def timeout(seconds: float) -> httpx.Timeout:
    """The timeout of one attempt: ``seconds`` for each read, short for connecting."""
    # Connecting should take milliseconds; a long connect wait only delays the fallback.
    return httpx.Timeout(seconds, connect=min(5.0, seconds))


def translate_http_error(exc: Exception, call: Call, *, streaming: bool = False) -> Failure:
    """The one translation of an httpx exception into a target_down Failure."""
    kind = next((name for cls, name in _TRANSPORT_KINDS if isinstance(exc, cls)), "http error")
    if isinstance(exc, httpx.TimeoutException):
        limit = min(5.0, call.timeout) if isinstance(exc, httpx.ConnectTimeout) else call.timeout
        kind = f"{kind} after {limit:g}s"
    if streaming:
        kind = f"stream cut ({kind})"
    return transport_failure(kind, str(exc), key=call.key)


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
    http: httpx.AsyncClient,
    call: Call,
    url: httpx.URL | str,
    content: bytes,
    headers: dict[str, str],
) -> httpx.Response:
    """POST a whole request; a transport failure is raised as UpstreamFailure."""
    failure: Failure | None = None
    try:
        return await http.post(url, content=content, headers=headers, timeout=timeout(call.timeout))
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    raise UpstreamFailure(failure)


@asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient,
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
        async with http.stream(
            "POST", url, content=content, headers=headers, timeout=timeout(call.timeout)
        ) as response:
            if response.is_success:
                yield response
                return
            body: bytes | None
            try:
                body = await response.aread()
            except HTTP_ERRORS:
                body = None  # the status alone still classifies it
            failure = classify_error(response, body)
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    raise UpstreamFailure(failure)

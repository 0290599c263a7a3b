"""What every upstream adapter shares: the POST, the streamed POST, and the one translation of
transport errors (those of ``routerd.upstream.wire``, raised by ``routerd.upstream.session``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache

from routerd.core.calls import Call
from routerd.core.classify import transport_failure
from routerd.core.outcome import Failure, UpstreamFailure
from routerd.upstream.session import Response, UpstreamSession
from routerd.upstream.sse import LineSplitter, SSEDecoder
from routerd.upstream.wire import (
    ConnectError,
    ConnectTimeout,
    Endpoint,
    HTTPError,
    InvalidURL,
    NetworkError,
    ProtocolError,
    ReadError,
    ReadTimeout,
    parse_endpoint,
)

__all__ = [
    "HTTP_ERRORS",
    "MAX_EVENT",
    "Answer",
    "Streamed",
    "endpoint",
    "open_stream",
    "post",
    "sse_events",
    "translate_http_error",
]

# Everything a failed exchange raises: the client's errors and a timeout from beneath them.
HTTP_ERRORS = (HTTPError, asyncio.TimeoutError)
# The most one line, or one event's data lines together, of a stream may hold (characters):
# a chunk is some hundred bytes; a server that never ends a line fails the stream instead.
MAX_EVENT = 16 * 1024 * 1024
# Most specific first: the first match names the failure.
_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (InvalidURL, "invalid url"),
    (ConnectTimeout, "connect timeout"),
    (ReadTimeout, "read timeout"),
    (ConnectError, "connect error"),
    (ProtocolError, "protocol error"),
    (ReadError, "read error"),
    (NetworkError, "network error"),
    (HTTPError, "network error"),
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
    """A successful upstream reply being streamed: status, headers, then its body, read
    piece by piece (``read``: b"" once it has ended); ``sse_events`` reads its events."""

    __slots__ = ("headers", "read", "status")

    def __init__(self, response: Response) -> None:
        self.status = response.status
        self.headers = response.headers
        self.read = response.conn.read


@lru_cache(maxsize=256)
def endpoint(base_url: str, path: str) -> Endpoint | str:
    """The URL of ``path`` under ``base_url``, parsed once. A URL that cannot be used comes
    back as the string, so the request fails with InvalidURL, as target_down."""
    url = f"{base_url.rstrip('/')}/{path}"
    try:
        return parse_endpoint(url)
    except InvalidURL:
        return url


def translate_http_error(exc: Exception, call: Call, *, streaming: bool = False) -> Failure:
    """The one translation of a transport error into a target_down Failure."""
    kind = next((name for cls, name in _KINDS if isinstance(exc, cls)), "http error")
    if "timeout" in kind:
        limit = call.connect_s if kind == "connect timeout" else call.timeout
        kind = f"{kind} after {limit:g}s"
    if streaming:
        kind = f"stream cut ({kind})"
    return transport_failure(kind, str(exc), key=call.key)


def _refused_header(exc: ValueError, call: Call) -> Failure:
    # A header value with a line break (a key file that kept its newline) is refused before
    # anything is sent; the message names the header, never the value, and is scrubbed too.
    return transport_failure("local protocol error", str(exc), key=call.key)


async def post(
    session: UpstreamSession,
    call: Call,
    url: Endpoint | str,
    content: bytes,
    headers: dict[str, str],
) -> Answer:
    """POST a whole request and read its reply; a transport failure is raised as UpstreamFailure."""
    failure: Failure
    try:
        response = await session.request(url, content, headers, call.timeout, call.connect_s)
        try:
            body = await response.conn.read_all()
        finally:
            response.release()
        return Answer(response.status, response.headers, body)
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call)
    except ValueError as exc:
        failure = _refused_header(exc, call)
    # Raised outside the except block so the client's exception is not chained onto it.
    raise UpstreamFailure(failure)


@asynccontextmanager
async def open_stream(
    session: UpstreamSession,
    call: Call,
    url: Endpoint | str,
    content: bytes,
    headers: dict[str, str],
    classify_error: Callable[[int, dict[str, str], bytes | None], Failure],
) -> AsyncIterator[Streamed]:
    """Open a streamed POST and yield it once the status says success.

    An error status (classified from its body) or a transport failure before that point
    is raised as UpstreamFailure: nothing has reached the client yet, so it can fall back.
    Leaving the block releases the connection: back to the pool when the whole reply had
    arrived, closed otherwise (a cancelled or abandoned stream).
    """
    failure: Failure
    try:
        response = await session.request(url, content, headers, call.timeout, call.connect_s)
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
                body = await response.conn.read_all()
            except HTTP_ERRORS:
                body = None  # the status alone still classifies it
            failure = classify_error(response.status, response.headers, body)
        finally:
            # Back to the pool when the reply came whole, closed otherwise (a cancelled or
            # abandoned stream).
            response.release()
    raise UpstreamFailure(failure)


async def sse_events(stream: Streamed, call: Call) -> AsyncIterator[tuple[str | None, str]]:
    """The (event, data) pairs of a streamed response, to its end.

    A transport error on the way (a cut, a timeout), or a line or an event past MAX_EVENT
    (a server that never ends one), is raised as UpstreamFailure.
    """
    decoder = SSEDecoder()
    splitter = LineSplitter()
    read = stream.read
    failure: Failure | None = None
    try:
        while chunk := await read():
            for line in splitter.feed(chunk):
                event = decoder.feed(line)
                if event is not None:
                    yield event
            if splitter.pending + decoder.size > MAX_EVENT:
                raise ProtocolError(f"an event of the stream passed {MAX_EVENT >> 20} MiB")
        for line in splitter.flush():
            event = decoder.feed(line)
            if event is not None:
                yield event
        event = decoder.flush()
        if event is not None:
            yield event
    except HTTP_ERRORS as exc:
        failure = translate_http_error(exc, call, streaming=True)
    # Raised outside the except block so the client's exception is not chained onto it.
    if failure is not None:
        raise UpstreamFailure(failure)

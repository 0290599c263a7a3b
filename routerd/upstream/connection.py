"""One upstream HTTP/1.1 connection: an asyncio Protocol around llhttp's response parser.

The protocol resolves the reader's futures from its callbacks, so an exchange runs no task of
its own. A read waits for at most the read timeout of silence; one timer per exchange checks
that, re-armed when it finds data came since, rather than a timer reset on every chunk.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

from routerd.upstream.wire import HTTPError, NetworkError, ProtocolError, ReadError, ReadTimeout

__all__ = ["HIGH_WATER", "LOW_WATER", "MAX_BODY", "MAX_HEAD", "MAX_INFLATED", "Connection"]

# Reading pauses when this much body waits unread (a reader slower than its server), and
# resumes once the reader has taken it down to LOW_WATER.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# What a server may send before it fails the exchange as a protocol error: a reply's
# headers; a body read whole (a chat completion is some kilobytes, a long one a few
# megabytes; a stream is read piece by piece and bounded by HIGH_WATER instead); what one
# compressed piece may expand to (a server compressing a reply routerd did not ask to be
# compressed, 64 times over).
MAX_HEAD = 256 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_INFLATED = 16 * 1024 * 1024

Key = tuple[str, str, int]


class _Stray(Exception):
    """A second response on one exchange: parsing stops and the connection is not reused."""


class _TooLarge(Exception):
    """A reply past one of the limits above: parsing stops and the exchange fails."""


class Connection(asyncio.Protocol):
    """A keep-alive connection that carries one exchange at a time.

    ``send`` starts an exchange; ``head`` awaits the status and headers; ``read`` returns
    the body piece by piece (b"" at its end). ``reusable`` says whether the exchange ended
    cleanly enough for another one. ``on_closed`` is told once when it closes, either way.
    """

    __slots__ = (
        "_buffered",
        "_busy",
        "_chunks",
        "_decoder",
        "_done",
        "_error",
        "_head_done",
        "_head_size",
        "_headers",
        "_interim",
        "_keep_alive",
        "_last",
        "_loop",
        "_parser",
        "_paused",
        "_status",
        "_timeout",
        "_timer",
        "_transport",
        "_waiter",
        "closed",
        "idle",
        "idle_since",
        "key",
        "on_closed",
        "request_head",
    )

    def __init__(self, key: Key) -> None:
        self.key = key
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        self.on_closed: Callable[[Connection], None] | None = None
        # Through an HTTP proxy, plain HTTP: the request line and Host in absolute form.
        self.request_head: bytes | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._busy = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._head_size = 0
        self._head_done = False
        self._interim = False
        self._done = False
        self._keep_alive = False
        self._error: HTTPError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._decoder: zlib._Decompress | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._last = 0.0

    # --- the exchange, as its caller sees it -----------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes of body received and not yet read (bounded: reading pauses past HIGH_WATER)."""
        return self._buffered

    @property
    def reusable(self) -> bool:
        """Whether the last response came whole and the server keeps the connection open."""
        return self._done and self._keep_alive and not self.closed

    def send(self, data: bytes | list[bytes], timeout: float) -> None:
        """Begin an exchange: write the request, and time the reads that follow."""
        self._busy = True
        self._status = 0
        self._headers = {}
        self._head_size = 0
        self._head_done = self._interim = self._done = self._keep_alive = False
        self._error = None
        self._decoder = None
        self._chunks.clear()
        self._buffered = 0
        self._timeout = timeout
        loop = self._loop
        self._last = loop.time()
        self._timer = loop.call_at(self._last + timeout, self._on_timer)
        transport = cast(asyncio.Transport, self._transport)
        if isinstance(data, list):
            transport.writelines(data)
        else:
            transport.write(data)

    async def head(self) -> tuple[int, dict[str, str]]:
        """The reply's status and headers (lower-case names; a repeated one keeps its last)."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._status, self._headers

    async def read(self) -> bytes:
        """The next piece of the body as it arrived; b"" once the body has ended."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= LOW_WATER:
                    self._paused = False
                    if not self.closed:
                        cast(asyncio.Transport, self._transport).resume_reading()
                return chunk
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body (taken as it comes, so reading is never paused for it), up to
        MAX_BODY: past it the exchange fails as a protocol error and the connection closes."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read():
            size += len(chunk)
            if size > MAX_BODY:
                error = ProtocolError(f"the reply's body passed {MAX_BODY >> 20} MiB")
                self._fail(error)
                raise error
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def detach(self) -> bool:
        """End the exchange: True if the connection may carry another, else it is closed.

        What of the reply was left unread goes now: a closed connection waits for the cycle
        collector (its parser calls back into it), and must not hold a body meanwhile.
        """
        self._chunks.clear()
        self._buffered = 0
        if not self.reusable:
            self.close()
            return False
        self._busy = False
        if self._paused:
            self._paused = False
            cast(asyncio.Transport, self._transport).resume_reading()
        return True

    def close(self) -> None:
        """Close now: abort, since nothing of an unfinished exchange is worth sending."""
        if self._busy and not self._done and self._error is None:
            self._error = NetworkError("the connection was closed under the exchange")
            self._wake()
        if self._transport is not None:
            self._transport.abort()
        self._closed_now()

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        # The silence that times a read out is the server's, counted from when it is awaited.
        self._last = self._loop.time()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        if self._done or self._error is not None or self.closed:
            return
        now = self._loop.time()
        if self._waiter is None:
            due = now + self._timeout  # nobody is waiting: no silence is being timed
        else:
            due = self._last + self._timeout
            if now >= due:
                self._fail(ReadTimeout(f"nothing received for {self._timeout:g}s"))
                return
        self._timer = self._loop.call_at(due, self._on_timer)

    def _fail(self, error: HTTPError) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()
        self.close()

    def _closed_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        on_closed = self.on_closed
        if on_closed is not None:
            on_closed(self)

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._done:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.close()
            return
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Stray):
                self.close()  # the reply was whole; what followed it is dropped
            elif isinstance(exc.__context__, _TooLarge):
                self._fail(ProtocolError(str(exc.__context__)))
            else:
                self._fail(ProtocolError(f"undecodable body: {exc.__context__}"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy and not self._done and self._error is None:
            # As aiohttp named them: a socket error before the reply (a reset) is a read
            # error, a quiet close a protocol error; a body cut short either way is a
            # protocol error (a payload error).
            if self._head_done and self._until_close():
                self._finish()  # no length, not chunked: the body ends with the connection
            elif self._head_done:
                cause = f" ({exc})" if exc is not None else ""
                self._error = ProtocolError(f"the connection closed within the reply's body{cause}")
            elif isinstance(exc, OSError):
                self._error = ReadError(str(exc))
            else:
                self._error = ProtocolError("server disconnected before replying")
            self._wake()
        self._closed_now()

    def _until_close(self) -> bool:
        headers = self._headers
        return "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        )

    # --- llhttp's callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            raise _Stray

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            raise _TooLarge(f"the reply's headers passed {MAX_HEAD >> 10} KiB")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._interim = True  # 103 Early Hints and the like: the real reply follows
            self._headers = {}
            return
        self._status = status
        encoding = self._headers.get("content-encoding")
        if encoding is not None:
            self._decoder = _decompressor(encoding.strip().lower())
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            body = self._decoder.decompress(body, MAX_INFLATED)
            if self._decoder.unconsumed_tail:
                raise _TooLarge(f"a compressed piece of the reply passed {MAX_INFLATED >> 20} MiB")
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            cast(asyncio.Transport, self._transport).pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    def _finish(self) -> None:
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
                self._buffered += len(tail)
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()


def _decompressor(encoding: str) -> zlib._Decompress | None:
    """The decoder of a Content-Encoding we did not ask for but a server sent anyway."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 says
    return None  # identity, or one we cannot decode: passed on as it came

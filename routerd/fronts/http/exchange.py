"""One request and its response on an HTTP front connection, as the ASGI app sees them.

An Exchange is the app's ``receive`` and ``send``: the body the connection parsed, handed
over without a wait when it is already whole (the usual case), and the response written to
the transport, its head held back until the first body bytes so a reply leaves in one write.
A response without Content-Length is sent chunked (or closes the connection on HTTP/1.0).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

import structlog

from routerd.fronts.http.asgi import Message, Scope
from routerd.fronts.http.connections import BODY_KEY, HANGUP_KEY, Hangup

if TYPE_CHECKING:
    from routerd.fronts.http.server import HttpConnection

log = structlog.get_logger("routerd.front")

_STATUS_LINES = {
    int(status): b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode()) for status in HTTPStatus
}
# Control characters other than tab: a value carrying one could split the head.
_BAD_HEADER = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ERROR_500 = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"21"),
    (b"connection", b"close"),
]


def status_line(status: int) -> bytes:
    """The status line of ``status`` (an unknown code gets an empty reason)."""
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % status


def plain_response(status: int, message: bytes, *extra: bytes) -> bytes:
    """A whole response, sent when no request is there to answer; the connection closes."""
    head = [
        status_line(status).rstrip(b"\r\n"),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(message),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + message


class Exchange:
    """One request's body on its way in and its response on its way out."""

    __slots__ = (
        "_connection",
        "_expect_continue",
        "_head",
        "_head_only",
        "_remaining",
        "_waiter",
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "delivered",
        "disconnected",
        "hangup",
        "keep_alive",
        "more_body",
        "scope",
        "started",
    )

    def __init__(
        self,
        connection: HttpConnection,
        scope: Scope,
        *,
        keep_alive: bool,
        expect_continue: bool,
        hangup: Hangup,
    ) -> None:
        self._connection = connection
        self.scope = scope
        scope[HANGUP_KEY] = hangup
        scope[BODY_KEY] = self.whole_body
        self.keep_alive = keep_alive
        self._expect_continue = expect_continue
        self.hangup = hangup
        self._head_only = scope["method"] == "HEAD"
        self._waiter: asyncio.Future[None] | None = None
        self._head: bytes | None = None
        # The body bytes the response still owes its Content-Length (None: no length).
        self._remaining: int | None = 0
        # The request body parsed and not yet received by the app.
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.delivered = False  # the app has received the body's end
        self.disconnected = False
        self.started = False
        self.chunked = False
        self.complete = False

    # ---- from the connection ----------------------------------------------------------

    def wake(self) -> None:
        """Something the app may be waiting for happened (body, its end, a disconnect)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def lost(self) -> None:
        """The connection is gone: the app's waits end and the request is cancelled."""
        self.disconnected = True
        self.hangup.lost()
        self.wake()

    async def run(self) -> None:
        """Run the app on this request; what it leaves unanswered gets a 500 or a close."""
        try:
            await self._run()
        finally:
            # The scope holds this exchange's method: no cycle is left for the collector.
            del self.scope[BODY_KEY]

    async def _run(self) -> None:
        try:
            await self._connection.site.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self._connection.close()
            raise
        except Exception:
            log.exception("http_request_failed", path=self.scope["path"])
            if not self.started:
                await self._internal_error()
            else:
                self._connection.close()
        else:
            if not self.disconnected and not self.complete:
                if self.started:
                    log.error("http_response_unfinished", path=self.scope["path"])
                    self._connection.close()
                else:
                    log.error("http_response_missing", path=self.scope["path"])
                    await self._internal_error()

    async def _internal_error(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": _ERROR_500})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    # ---- the app's receive and send ------------------------------------------------------

    def whole_body(self) -> bytes | None:
        """The body, if it has all arrived and none of it was received yet; else None."""
        if self.more_body or self.delivered or self.disconnected:
            return None
        return self._take()

    async def receive(self) -> Message:
        """The next piece of the body; http.disconnect once the client left, or, after the
        whole body, when the response is complete or the client leaves."""
        if self._expect_continue:
            self._expect_continue = False
            if not self.started and self.more_body:
                self._connection.write(_CONTINUE)
        while not (self.disconnected or self.complete):
            if self.chunks or (not self.more_body and not self.delivered):
                body = self._take()
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            self._connection.resume_reading()
            await self._wait()
        return {"type": "http.disconnect"}

    def _take(self) -> bytes:
        """The body parsed so far and not yet received, now received."""
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.delivered = not self.more_body
        self._connection.resume_reading()
        return body

    async def _wait(self) -> None:
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def send(self, message: Message) -> None:
        """Write the response: its start is held until the first body bytes go with it."""
        connection = self._connection
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"a response must begin with http.response.start, not {kind}")
            self._head = self._encode_head(message["status"], message.get("headers", ()))
            self.started = True
            return
        if self.complete or kind != "http.response.body":
            raise RuntimeError(f"unexpected {kind} after the response")
        self._write_body(message.get("body", b""), message.get("more_body", False))

    def _write_body(self, body: bytes, more: bool) -> None:
        if self._head_only:
            body = b""
        elif self.chunked:
            framed = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            body = framed if more else framed + b"0\r\n\r\n"
        elif self._remaining is not None:
            self._remaining -= len(body)
            if self._remaining < 0 or (not more and self._remaining):
                raise RuntimeError("the response body does not match its Content-Length")
        head, self._head = self._head, None
        if head is not None:
            self._connection.write(head + body)  # the first bytes go at once
        elif body:
            self._connection.write(body, soon=more)
        if not more:
            self.complete = True
            self.chunks.clear()  # a body the response did not wait for is dropped
            self.buffered = 0
            self.wake()
            self._connection.finished(self)

    def _encode_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        headers = list(headers)
        # One scan of every name and value: a control character would let an app's header
        # write a header (or a response) of its own.
        if _BAD_HEADER.search(b"\t".join(part for header in headers for part in header)):
            bad = next(name for name, value in headers if _BAD_HEADER.search(name + value))
            raise RuntimeError(f"a control character in the response header {bad!r}")
        lines = [status_line(status)]
        length: int | None = None
        said_close = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                said_close = True
            lines.append(b"%b: %b\r\n" % (lowered, value))
        lines.append(self._connection.site.date_header())
        if length is not None:
            self._remaining = 0 if self._head_only else length
        elif self._head_only or status in (204, 304) or status < 200:
            self._remaining = 0
        elif self.scope["http_version"] == "1.1":
            self.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0: the body ends where the connection does
            self._remaining = None
        if not self.keep_alive and not said_close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

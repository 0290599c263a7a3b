"""Raw ASGI plumbing shared by every dialect: read a request, answer it, stream, hang up.

No framework: the mock needs a handful of responses and, unusually, a way to break the
connection on purpose, which frameworks hide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# The scope extension through which the server lets the app drop the connection; see
# routerd.mock.connection for the uvicorn side.
ABORT_EXTENSION = "routerd.mock.abort"

MAX_BODY_BYTES = 64 * 1024 * 1024

# After dropping the connection, how long to wait for the server to notice. It notices on
# the next loop iteration; the bound only keeps a wait from being unbounded.
_ABORT_GRACE_S = 5.0


class BodyTooLargeError(Exception):
    """The request body exceeds MAX_BODY_BYTES."""


@dataclass(frozen=True, slots=True)
class Request:
    """A fully read HTTP request; header names are lower-case, the last value wins."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def read_request(scope: Scope, receive: Receive) -> Request | None:
    """Read the whole request body; None when the client hung up first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", [])
    }
    return Request(
        method=scope["method"], path=scope["path"], headers=headers, body=b"".join(chunks)
    )


async def cancel_on_disconnect(receive: Receive, handler: Callable[[], Awaitable[None]]) -> None:
    """Run ``handler`` until it returns or the client goes away, whichever comes first.

    ASGI servers do not cancel an app whose client left; they only report it through
    ``receive``. Without this a hanging request (the timeout fault) would outlive its client.
    The body must already have been read.
    """
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            # After the body, receive() only returns once the client is gone or the response
            # is complete; either way nothing is left to do.
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await handler()
        tg.cancel_scope.cancel()


class Responder:
    """Sends one response: a whole body, a server-sent event stream, or a broken connection."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self._scope = scope
        self._send = send

    async def body(
        self, status: int, content: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """Send a complete response with a content-length."""
        await self.start(status, [*headers, (b"content-length", str(len(content)).encode())])
        await self._send({"type": "http.response.body", "body": content, "more_body": False})

    async def start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Send the status line and headers; the body follows through ``write``."""
        await self._send(
            {"type": "http.response.start", "status": status, "headers": list(headers)}
        )

    async def write(self, content: bytes, *, last: bool = False) -> None:
        """Send part of the body; ``last`` completes the response."""
        await self._send({"type": "http.response.body", "body": content, "more_body": not last})

    async def event(self, data: bytes) -> None:
        """Send one server-sent event carrying ``data``."""
        await self.write(b"data: " + data + b"\n\n")

    async def hang_up(self, *, reset: bool) -> None:
        """Drop the connection: a TCP reset (``reset``) or an orderly close mid-response.

        Returns only by cancellation, once the server has seen the connection go (so run
        this under cancel_on_disconnect), or after a grace period.
        """
        extension = self._scope.get("extensions", {}).get(ABORT_EXTENSION)
        if extension is None:
            raise RuntimeError(
                "this server cannot drop connections; serve with routerd.mock.server"
            )
        abort: Callable[[bool], None] = extension["abort"]
        abort(reset)
        await anyio.sleep(_ABORT_GRACE_S)

"""ASGI plumbing the HTTP front's app shares: starting a response, JSON and error replies,
and the request headers and scope keys routerd reads."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from routerd.fronts.http.connections import CLIENT_KEY
from routerd.fronts.http.errors import HttpError
from routerd.fronts.http.wire import JSON, ShapeError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Headers:
    """A request's headers by (lowercase) name; a value is decoded only when it is read."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        # ASGI servers give names in lowercase; a repeated name keeps its last value.
        self._raw = dict(raw)

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._raw.get(name.encode())
        return default if value is None else value.decode("latin-1")

    def __contains__(self, name: str) -> bool:
        return name.encode() in self._raw


def routing_headers(headers: Headers) -> tuple[float | None, int]:
    """x-routerd-deadline (seconds) and x-routerd-priority, which SDKs send as extra headers."""
    deadline: float | None = None
    priority = 0
    raw = headers.get("x-routerd-deadline")
    if raw is not None:
        try:
            deadline = float(raw)
        except ValueError:
            deadline = math.nan
        if not (math.isfinite(deadline) and deadline > 0):
            raise ShapeError(f"x-routerd-deadline must be a positive number of seconds: {raw!r}")
    raw = headers.get("x-routerd-priority")
    if raw is not None:
        try:
            priority = int(raw)
        except ValueError:
            raise ShapeError(f"x-routerd-priority must be an integer: {raw!r}") from None
    return deadline, priority


def client_of(scope: Scope) -> str:
    """The sender's name: the peer's pid on the Unix socket, host:port on TCP."""
    named = scope.get(CLIENT_KEY)
    if isinstance(named, str):
        return named
    client = scope.get("client")
    if client:
        return f"tcp:{client[0]}:{client[1]}"
    return "http"


def length(content: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(content)).encode())


async def start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def reply_json(send: Send, status: int, content: bytes) -> None:
    await start(send, status, [JSON, length(content)])
    await send({"type": "http.response.body", "body": content})


async def reply_error(
    send: Send, error: HttpError, *, retry_after_s: int | None = None, close: bool = False
) -> None:
    """Send ``error``; ``close`` when the rest of the request will not be read."""
    content = error.encode()
    headers = [*error.headers, length(content)]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await start(send, error.status, headers)
    await send({"type": "http.response.body", "body": content})

"""Reading an HTTP request body within the buffer budget and the read timeout.

Every byte of a body that is still arriving is first reserved in the daemon's one
BufferBudget (shared with the msgpack front), so clients that announce large bodies and
then stall hold no more than ``server.buffer_budget`` between them: a declared
Content-Length is reserved whole before anything is read, a chunked body chunk by chunk.
A reservation ends when the body is complete or refused, or its client leaves.

The bytes gather in an anonymous mmap rather than a list of chunks or a growing bytearray:
its pages are committed only as bytes arrive, and they go back to the OS the moment the
body is done, instead of staying in a fragmented heap after a crowd of large bodies.
"""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from routerd.fronts.budget import BufferBudget

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class BodyTooLarge(Exception):
    """The body is (or announces itself as) larger than server.max_frame."""


class BodyTimeout(Exception):
    """The body did not arrive whole within server.read_timeout_s."""


async def read_body(
    receive: Receive,
    content_length: str | None,
    *,
    limit: int,
    budget: BufferBudget,
    timeout_s: float,
    whole: Callable[[], bytes | None] | None = None,
) -> bytes | None:
    """The whole body, or None if the client left first.

    ``whole``, where the server offers it, hands over a body that has all arrived: it is
    in memory already, so it is taken as it is, without a reservation or a timer.

    Raises BodyTooLarge past ``limit`` (before reading, when Content-Length says so),
    BudgetExhausted when the budget stays full for ``timeout_s``, and BodyTimeout when the
    body is not whole ``timeout_s`` after reading began.
    """
    declared = int(content_length) if content_length and content_length.isdigit() else None
    if declared is not None and declared > limit:
        raise BodyTooLarge
    arrived = whole() if whole is not None else None
    if arrived is not None:
        if len(arrived) > limit:
            raise BodyTooLarge
        return arrived
    return await _arriving(receive, declared, limit=limit, budget=budget, timeout_s=timeout_s)


async def _arriving(
    receive: Receive, declared: int | None, *, limit: int, budget: BufferBudget, timeout_s: float
) -> bytes | None:
    """read_body's way for a body still arriving: reserved, timed and gathered."""
    reserved = 0
    buffer: mmap.mmap | None = None
    try:
        if declared is not None:
            await budget.reserve(declared, timeout_s)
            reserved = declared
        capacity = limit if declared is None else declared
        size = 0
        with anyio.move_on_after(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk: bytes = message.get("body", b"")
                more = message.get("more_body", False)
                if buffer is None and not more and len(chunk) <= capacity:
                    return chunk  # the whole body in one piece (the usual case): no copy
                if chunk:
                    if size + len(chunk) > capacity:
                        raise BodyTooLarge
                    if declared is None:
                        await budget.reserve(len(chunk), timeout_s)
                        reserved += len(chunk)
                    if buffer is None:
                        buffer = mmap.mmap(-1, capacity)
                    buffer.write(chunk)
                    size += len(chunk)
                if not more:
                    # One copy out of the mapping, which closes right after.
                    return b"" if buffer is None else buffer[:size]
        raise BodyTimeout
    finally:
        if buffer is not None:
            buffer.close()
        if reserved:
            budget.release(reserved)

"""The faults every dialect of the mock plays the same way: hang, reset, errors, cut bodies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

import anyio

from routerd.mock.asgi import Responder
from routerd.mock.spec import ModelSpec
from routerd.mock.state import MockState

# How long a "timeout" fault hangs: far past any client timeout, ended by the disconnect.
HANG_S = 3600.0

Detail = TypeVar("Detail", contravariant=True)


class FaultyCall(Protocol[Detail]):
    """One admitted request of any dialect: where it counts, and how it answers an error."""

    state: MockState
    reply: Responder

    def record(self, outcome: str) -> None:
        """Count the request's outcome in the stats."""
        ...

    async def error(self, status: int, detail: Detail) -> None:
        """Answer with an error in the dialect's own shape."""
        ...


async def wait_or_fail(
    call: FaultyCall[Detail],
    fault: str | None,
    sleep_ms: float | None,
    model: ModelSpec,
    server_faults: Mapping[str, tuple[int, Detail]],
) -> float | None:
    """Sleep the request's latency and play the faults all dialects share.

    Returns the delay slept, or None when a fault already ended the request.
    """
    if fault == "timeout":
        # Counted now: the client gives up long before there is a status to count.
        call.record("timeout")
        await anyio.sleep(HANG_S)
        return None
    delay = sleep_ms / 1000 if sleep_ms is not None else call.state.latency_s(model)
    await anyio.sleep(delay)
    if fault == "reset":
        call.record("reset")
        await call.reply.hang_up(reset=True)
        return None
    if fault is not None and fault in server_faults:
        status, detail = server_faults[fault]
        await call.error(status, detail)
        return None
    return delay


async def send_body(
    reply: Responder, body: bytes, headers: Iterable[tuple[bytes, bytes]], *, cut: bool
) -> None:
    """A whole response; with ``cut``, half of it and then the connection closes."""
    if not cut:
        await reply.body(200, body, headers)
        return
    # A body shorter than its content-length: the client sees the connection end early.
    length = (b"content-length", str(len(body)).encode())
    await reply.start(200, [*headers, length])
    await reply.write(body[: len(body) // 2])
    await reply.hang_up(reset=False)

"""Running one request so that it ends when its client leaves, or when the front stops.

``active`` holds the cancel scope of every request running, which the front cancels all at
once past the shutdown drain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import structlog

from routerd.core.calls import Reply
from routerd.core.errors import Refused
from routerd.fronts.http.asgi import Receive
from routerd.fronts.http.connections import Hangup

log = structlog.get_logger("routerd.front")

Dispatch = Callable[[], Awaitable[Reply]]
# (the reply or the refusal, or None when the front cancelled it to stop; client gone)
Outcome = tuple[Reply | Refused | None, bool]


async def hung_up_on(hangup: Hangup, active: set[anyio.CancelScope], dispatch: Dispatch) -> Outcome:
    """(outcome, client gone), as ``watched``, with the protocol's Hangup cancelling the
    request (and its upstream call) when the client leaves: no watcher task."""
    outcome: Reply | Refused | None = None
    with anyio.CancelScope() as scope:
        active.add(scope)
        hangup.watch(scope)
        try:
            outcome = await _outcome(dispatch)
        finally:
            hangup.finish()
            active.discard(scope)
    return outcome, hangup.gone


async def watched(receive: Receive, active: set[anyio.CancelScope], dispatch: Dispatch) -> Outcome:
    """(outcome, client gone); the outcome is None when the front cancelled it to stop.

    ASGI servers do not cancel an app whose client left; they only tell ``receive``.
    Under another server than routerd's own protocol, the request runs beside a watcher
    that cancels it (and its upstream call) then.
    """
    outcome: Reply | Refused | None = None
    gone = False
    async with anyio.create_task_group() as tg:
        active.add(tg.cancel_scope)
        try:

            async def watch() -> None:
                nonlocal gone
                # The body is read: receive() now returns only once the client is gone.
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            outcome = await _outcome(dispatch)
            tg.cancel_scope.cancel()
        finally:
            active.discard(tg.cancel_scope)
    return outcome, gone


async def _outcome(dispatch: Callable[[], Awaitable[Reply]]) -> Reply | Refused:
    """The reply, or the refusal; a crash in routerd is refused as internal, and logged."""
    try:
        return await dispatch()
    except Refused as exc:
        return exc
    except Exception:
        log.exception("http_request_crashed")
        return Refused("internal", "routerd failed on this request")

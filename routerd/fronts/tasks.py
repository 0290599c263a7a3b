"""The tasks a front runs its requests in: plain asyncio tasks, held until they end.

A plain task costs a request a fifth of what anyio's ``start_soon`` does. The price is that
no task group waits for them: the front cancels (``cancel``) and awaits (``ended``) them
itself when it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class RequestTasks:
    """The requests a front has running, each in a task of its own."""

    __slots__ = ("_crashed", "_running")

    def __init__(self, crashed: Callable[[BaseException], None] | None = None) -> None:
        """``crashed`` hears of a task that ended with an exception (not a cancel)."""
        self._running: set[asyncio.Task[None]] = set()
        self._crashed = crashed

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own, held here until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._crashed is not None and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._crashed(exc)

    def cancel(self) -> None:
        """Cancel every task still running."""
        for task in list(self._running):
            task.cancel()

    async def ended(self) -> None:
        """Return once no task runs (tasks spawned meanwhile included)."""
        while self._running:
            await asyncio.wait(list(self._running))

"""The buffer budget: bytes that incomplete msgpack frames and HTTP request bodies hold.

One budget for the whole daemon, not one per connection, so a crowd of clients that each
announce a large frame and then stall cannot take more memory than the operator allowed
(``server.buffer_budget``). A reader reserves what it is about to hold before it reads,
and gives it back when the frame or body is complete, refused, or its connection closes.
"""

from __future__ import annotations

import anyio


class BudgetExhausted(Exception):
    """The budget stayed full for as long as the reader could wait."""

    def __init__(self, wanted: int, limit: int) -> None:
        super().__init__(
            f"routerd is holding its whole buffer budget ({limit} bytes, server.buffer_budget) "
            f"for other incomplete requests; {wanted} more bytes did not fit in time"
        )
        self.wanted = wanted
        self.limit = limit


class BufferBudget:
    """A counter of reserved bytes with a ceiling; waiters are woken as bytes come back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._freed = anyio.Event()
        self._waiting = 0

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes now if they fit; a single request never exceeds the limit."""
        if size > self.limit - self.used:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    async def reserve(self, size: int, wait_s: float) -> None:
        """Reserve ``size`` bytes, waiting up to ``wait_s`` s; raises BudgetExhausted."""
        if size > self.limit:
            self.refused += 1
            raise BudgetExhausted(size, self.limit)
        if self.try_reserve(size):
            return  # the common case: room now, no timer to arm
        self._waiting += 1
        try:
            with anyio.move_on_after(wait_s):
                while not self.try_reserve(size):
                    await self._freed.wait()
                return
        finally:
            self._waiting -= 1
        self.refused += 1
        raise BudgetExhausted(size, self.limit)

    def release(self, size: int) -> None:
        """Give back ``size`` reserved bytes and wake whoever waits for room."""
        self.used = max(0, self.used - size)
        if self._waiting:
            self._freed.set()
            self._freed = anyio.Event()

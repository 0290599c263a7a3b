"""A connection's writes held to the end of the event loop's turn.

A stream's chunks that one upstream read brought are encoded one after another within one
turn; held, they leave in one write (one system call, one read for the client) instead of
one each. What is written at once takes what is held with it, first, so the bytes keep
their order.
"""

from __future__ import annotations

import asyncio


class HeldWrites:
    """The writes a transport is given at the end of this loop turn (``hold``) or now
    (``write``, after what is held); nothing is written once the transport is closing."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def hold(self, data: bytes) -> None:
        """Write ``data`` at the end of this loop turn, with whatever else is held by then."""
        if self._held is None:
            self._held = [data]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._held.append(data)

    def write(self, data: bytes) -> None:
        """Write ``data`` now, after what is held, in one write."""
        held, self._held = self._held, None
        if not self._transport.is_closing():
            self._transport.write(data if held is None else b"".join([*held, data]))

    def flush(self) -> None:
        """Write what is held now (before the transport closes or ends its stream)."""
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

"""Reading frames off a client connection, within a time limit and the daemon's buffer budget.

Waiting for a frame's header has no deadline: an idle connection waits there. Once a header
has arrived, the body's declared size is reserved from the global BufferBudget (waiting up
to ``read_timeout_s`` for room) and the body must arrive whole within ``read_timeout_s``;
the reservation is given back when the body is read, refused or abandoned. A large body is
received into one buffer of exactly its size, so a stalled frame holds what it declared and
no more: no growing buffer for the allocator to scatter, no copy of a copy at the end. A
body abandoned (stalled, cut off, cancelled) is dropped with its reservation: the budget
counts memory that is really free again, whoever still holds the reader.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteReceiveStream
from routerd_client.wire import FrameDecoder

from routerd.fronts.budget import BufferBudget

#: Frames up to this size are read without a reservation from the buffer budget: the kernel
#: buffers as much per connection anyway, max_connections bounds the total, and ordinary
#: requests must not queue behind large frames that stall while they hold the budget.
UNRESERVED_FRAME = 64 * 1024


class FrameStalled(Exception):
    """A frame's header arrived but its body did not arrive whole in time."""

    def __init__(self, size: int, timeout_s: float) -> None:
        super().__init__(
            f"frame not completed within {timeout_s:g} s (server.read_timeout_s): "
            f"{size} bytes were announced"
        )


class FrameReader:
    """Frames from one connection; ``read`` raises FrameTooLarge, BudgetExhausted,
    FrameStalled, and anyio's EndOfStream or IncompleteRead when the client goes.

    The cutting into frames is FrameDecoder's; this adds the reads, the deadline and the
    reservation.
    """

    def __init__(
        self,
        stream: ByteReceiveStream,
        *,
        max_frame: int,
        budget: BufferBudget,
        read_timeout_s: float,
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.budget = budget
        self.read_timeout_s = read_timeout_s
        # A body above what is read unreserved goes into one buffer of its exact size,
        # allocated only after its reservation.
        self._frames = FrameDecoder(max_frame, exact_above=UNRESERVED_FRAME)
        self._closed = False

    async def read(self) -> bytes | bytearray:
        """The next frame's body."""
        if self._closed:
            raise anyio.ClosedResourceError
        frames = self._frames
        while (size := frames.frame_size()) is None:
            await self._receive()
        body = frames.next_frame()
        if body is not None:
            # The usual case: the whole frame came in one read, nothing to wait for.
            return body
        reserved = size if size > UNRESERVED_FRAME else 0
        if reserved and not self.budget.try_reserve(reserved):
            await self.budget.reserve(reserved, self.read_timeout_s)
        try:
            with anyio.move_on_after(self.read_timeout_s):
                while (body := frames.next_frame()) is None:
                    await self._receive()
                return body
            raise FrameStalled(size, self.read_timeout_s)
        finally:
            if reserved:
                self.budget.release(reserved)
                if body is None:  # abandoned: its buffer goes with its reservation
                    self.close()

    def close(self) -> None:
        """Drop whatever part of a frame is buffered; nothing is read from here on."""
        self._closed = True
        self._frames.clear()

    async def _receive(self) -> None:
        frames = self._frames
        try:
            data = await self.stream.receive(frames.want())
        except anyio.EndOfStream:
            if frames.buffered:
                raise anyio.IncompleteRead from None
            raise
        frames.feed(data)

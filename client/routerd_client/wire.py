"""The wire protocol without I/O: bytes in, frames and routed replies out (as h11 does for HTTP).

FrameDecoder cuts a byte stream into frame bodies and refuses an oversize frame from its
header. ClientProtocol adds the client's side: it decodes the daemon's messages, hands each
to the request waiting for its id, and says when the connection as a whole has failed. The
sync client, the async client and the daemon each add only their own reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Generic, TypeAlias, TypeVar

import msgspec

from .errors import BadRequest, DeadlineExceeded, ProtocolError, RouterdError, error_from_message
from .protocol import (
    HEADER,
    HEADER_SIZE,
    Chunk,
    DaemonMessage,
    Error,
    FrameTooLarge,
    Reloaded,
    Result,
    StatusReport,
    Welcome,
    daemon_decoder,
)

#: A body above this size is received into one buffer of exactly its size: no growing
#: buffer for the allocator to scatter, no copy of a copy at the end.
EXACT_ABOVE = 64 * 1024
#: How much to ask the transport for at a time.
READ_SIZE = 64 * 1024

#: What a request's queue receives: the daemon's messages for its id, or a failure of the
#: whole connection (one fresh exception per request, so threads never share a traceback).
Reply: TypeAlias = Chunk | Result | Error | StatusReport | Reloaded | RouterdError
#: A reply that is not a failure: what a request's wait returns.
Answer: TypeAlias = Chunk | Result | StatusReport | Reloaded

Q = TypeVar("Q")


class FrameDecoder:
    """Frame bodies out of a byte stream fed in pieces of any size.

    ``feed`` the bytes as they come, then take bodies from ``next_frame`` until it returns
    None. A header announcing more than ``max_frame`` raises FrameTooLarge before any of the
    body is needed. A body above ``exact_above`` bytes is gathered in one buffer of its
    exact size, allocated on the first ``feed`` after its header, so a reader may reserve
    memory for it once ``frame_size`` has told it how much.
    """

    __slots__ = ("_body", "_buffer", "_filled", "_size", "exact_above", "max_frame")

    def __init__(self, max_frame: int, *, exact_above: int = EXACT_ABOVE) -> None:
        self.max_frame = max_frame
        self.exact_above = exact_above
        self._buffer = bytearray()
        # The body size of the frame whose header has been read; -1 between frames.
        self._size = -1
        self._body: bytearray | None = None
        self._filled = 0

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet handed out: nonzero means a frame has begun."""
        return len(self._buffer) + self._filled

    def want(self) -> int:
        """How many bytes to read next; never past the end of a large body."""
        size = self._size
        if size > self.exact_above:
            return min(READ_SIZE, size - self.buffered)
        return READ_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes as they came off the transport."""
        body = self._body
        if body is None:
            size = self._size
            if size <= self.exact_above or len(self._buffer) + len(data) >= size:
                self._buffer += data
                return
            body = self._body = bytearray(size)
            self._filled = len(self._buffer)
            body[: self._filled] = self._buffer
            self._buffer.clear()
        filled = self._filled
        room = len(body) - filled
        if len(data) <= room:
            body[filled : filled + len(data)] = data
            self._filled = filled + len(data)
        else:
            with memoryview(data) as view:
                body[filled:] = view[:room]
                self._buffer += view[room:]
            self._filled = len(body)

    def whole(self, data: bytes) -> memoryview | None:
        """The body of ``data`` if it is exactly one whole frame and none is under way.

        The usual case, one frame per read, skips the buffer: no copy, nothing to reset.
        Otherwise None, and ``data`` is still to be fed.
        """
        if self._size < 0 and not self._buffer and len(data) >= HEADER_SIZE:
            (size,) = HEADER.unpack_from(data)
            if size == len(data) - HEADER_SIZE and size <= self.max_frame:
                return memoryview(data)[HEADER_SIZE:]
        return None

    def frame_size(self) -> int | None:
        """The body size of the frame under way, reading its header once whole; else None.

        Raises FrameTooLarge for a header above ``max_frame``.
        """
        if self._size < 0:
            buffer = self._buffer
            if len(buffer) < HEADER_SIZE:
                return None
            (size,) = HEADER.unpack_from(buffer)
            if size > self.max_frame:
                raise FrameTooLarge(size, self.max_frame)
            del buffer[:HEADER_SIZE]
            self._size = size
        return self._size

    def next_frame(self) -> bytes | bytearray | None:
        """The next whole frame's body, or None until more bytes are fed."""
        size = self._size
        if size < 0:
            started = self.frame_size()
            if started is None:
                return None
            size = started
        body = self._body
        if body is not None:
            if self._filled < size:
                return None
            self._body = None
            self._filled = 0
            self._size = -1
            return body
        buffer = self._buffer
        if len(buffer) < size:
            return None
        self._size = -1
        if len(buffer) == size:
            # The usual case, one frame per read: hand the buffer over rather than copy it.
            self._buffer = bytearray()
            return buffer
        with memoryview(buffer) as view:
            frame = bytes(view[:size])
        del buffer[:size]
        return frame

    def clear(self) -> None:
        """Drop every byte fed and the frame under way, its buffer with it."""
        self._buffer = bytearray()
        self._body = None
        self._filled = 0
        self._size = -1


class ConnectionFailed(Exception):
    """The connection cannot go on; ``failure`` makes the error each pending request gets."""

    def __init__(self, failure: Callable[[], RouterdError]) -> None:
        super().__init__()
        self.failure = failure


class ClientProtocol(Generic[Q]):
    """The client's side of one connection: frames in, each reply to its request's queue.

    ``pending`` maps a request id to its queue ``Q``; ``deliver`` puts a reply on one (it is
    ``queue.SimpleQueue.put`` or ``asyncio.Queue.put_nowait``). A Chunk goes to its request;
    a Result, Error, StatusReport or Reloaded ends it and its id leaves ``pending``. A reply
    for an id nobody waits for is dropped.
    """

    def __init__(self, max_frame: int, deliver: Callable[[Q, Reply], object]) -> None:
        self.pending: dict[int, Q] = {}
        self.frames = FrameDecoder(max_frame)
        self._deliver = deliver

    def next_message(self) -> DaemonMessage | None:
        """The next whole message fed in, or None; raises ConnectionFailed on bad bytes."""
        try:
            body = self.frames.next_frame()
            return None if body is None else daemon_decoder.decode(body)
        except FrameTooLarge as exc:
            raise ConnectionFailed(partial(frame_too_large, exc)) from exc
        # msgspec raises UnicodeDecodeError, not DecodeError, for a string not in UTF-8.
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ConnectionFailed(partial(undecodable, exc)) from exc

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the daemon and deliver every whole message in them.

        Raises ConnectionFailed for bytes that cannot be trusted and for a connection-level
        Error (one without an id): the daemon drops the connection after it.
        """
        body = self.frames.whole(data)
        if body is not None:
            try:
                message: DaemonMessage | None = daemon_decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise ConnectionFailed(partial(undecodable, exc)) from exc
        else:
            self.frames.feed(data)
            message = self.next_message()
        pending = self.pending
        deliver = self._deliver
        while message is not None:
            if isinstance(message, Chunk):
                replies = pending.get(message.id)
                if replies is not None:
                    deliver(replies, message)
            elif not isinstance(message, Welcome):
                if message.id is not None:
                    # A terminal message: the request is over, and a late Cancel for it is
                    # not sent because its id has left ``pending``.
                    replies = pending.pop(message.id, None)
                    if replies is not None:
                        deliver(replies, message)
                elif isinstance(message, Error):
                    raise ConnectionFailed(partial(error_from_message, message))
            message = None if body is not None else self.next_message()

    def fail_all(self, failure: Callable[[], RouterdError]) -> None:
        """Give every pending request a fresh error from ``failure``; none stays pending."""
        pending = self.pending
        while pending:
            try:
                _, replies = pending.popitem()
            except KeyError:  # another thread emptied it between the test and the pop
                break
            self._deliver(replies, failure())


def answer(item: Reply) -> Answer:
    """What a request's wait returns for ``item``: a daemon Error or a failure is raised."""
    if isinstance(item, RouterdError):
        raise item
    if isinstance(item, Error):
        raise error_from_message(item)
    return item


def no_reply(timeout: float | None) -> DeadlineExceeded:
    """The error for a request whose next reply did not come within ``timeout`` seconds."""
    return DeadlineExceeded(f"no reply from routerd within {timeout} s")


def check_request_size(frame: bytes, welcome: Welcome) -> None:
    """Refuse a request frame above the daemon's max_frame before it is sent."""
    if len(frame) - HEADER_SIZE > welcome.max_frame:
        raise BadRequest(
            f"the request is {len(frame) - HEADER_SIZE} bytes, above routerd's "
            f"max_frame of {welcome.max_frame} bytes"
        )


def frame_too_large(exc: FrameTooLarge) -> ProtocolError:
    """The error for a frame from the daemon above this client's max_frame."""
    return ProtocolError(
        f"routerd sent a frame of {exc.size} bytes, above this client's max_frame of "
        f"{exc.limit} bytes; the connection was dropped"
    )


def undecodable(exc: Exception) -> ProtocolError:
    """The error for a frame from the daemon that is not a message this client knows."""
    return ProtocolError(f"routerd sent a message this client cannot read ({exc})")

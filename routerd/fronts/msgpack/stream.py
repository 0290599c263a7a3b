"""The msgpack socket's connections on asyncio transports, as anyio socket streams.

anyio's Unix socket stream waits for each read by registering the socket with the event
loop and removing it again: two epoll changes, the selector's bookkeeping and a socket
repr per frame, about a tenth of the Python calls a request cost the daemon. A transport
keeps the socket registered for its whole life and hands the bytes over as they arrive, so
a request's frame costs one read. ``TransportStream`` puts such a transport behind anyio's
``SocketStream`` interface, so the framing, the guard and the server above it stay as they
are; the listener accepts straight into it.

Reading is bounded: past ``INBOX_HIGH`` unread bytes the transport stops reading, so a
client that sends faster than its frames are taken (or a frame waiting for the buffer
budget) holds at most that much here, plus one read, and the rest waits in the kernel.
Writing goes into the transport at once (no trip through the event loop) and waits only
while the transport's buffer is over its high-water mark, for a client that does not read.
A stream's chunks may instead be held to the end of the loop turn (``hold``, see
``HeldWrites``), so that the chunks one upstream read brought leave in one write.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections import deque
from pathlib import Path
from typing import cast

import anyio
from anyio.abc import SocketListener, SocketStream

from routerd.fronts.held import HeldWrites

__all__ = ["TransportStream", "UnixListener", "bind_unix"]

#: Unread bytes a connection holds before the transport stops reading from the socket.
INBOX_HIGH = 64 * 1024
BACKLOG = 4096


class _Inbox(asyncio.Protocol):
    """The transport's side: received bytes queue here until the stream takes them."""

    __slots__ = (
        "_drained",
        "_waiter",
        "chunks",
        "closed",
        "eof",
        "error",
        "paused_reading",
        "paused_writing",
        "size",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.closed = False
        self.error: Exception | None = None
        self.paused_reading = False
        self.paused_writing = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes; they have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= INBOX_HIGH and not self.paused_reading:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused_reading = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our side open: the daemon may still have replies to write

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        self._wake_writers()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._wake_writers()

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what has arrived (at least one byte is there)."""
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.size -= len(chunk)
        if self.paused_reading and self.size < INBOX_HIGH and not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()
            self.paused_reading = False
        return chunk

    async def arrival(self) -> None:
        """Wait until bytes, the end of the stream or the loss of the connection arrive."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def drained(self) -> None:
        """Wait until the transport takes writes again (or the connection is gone)."""
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writers(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


class TransportStream(SocketStream):
    """One accepted connection: anyio's stream semantics over an asyncio transport.

    ``receive`` raises EndOfStream when the client closed its side, BrokenResourceError when
    the connection broke and ClosedResourceError after ``aclose``; ``send`` raises
    BrokenResourceError once the connection is gone.
    """

    def __init__(self, sock: socket.socket, transport: asyncio.Transport, inbox: _Inbox) -> None:
        self._sock = sock
        self._transport = transport
        self._inbox = inbox
        self._closing = False
        self._writes = HeldWrites(transport)

    @classmethod
    async def attach(cls, sock: socket.socket) -> TransportStream:
        """The stream of an accepted socket, which it owns from now on."""
        loop = asyncio.get_running_loop()
        try:
            transport, inbox = await loop.connect_accepted_socket(_Inbox, sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock, transport, inbox)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        inbox = self._inbox
        while not inbox.chunks:
            if self._closing:
                raise anyio.ClosedResourceError
            if inbox.closed:
                if inbox.error is not None:
                    raise anyio.BrokenResourceError from inbox.error
                raise anyio.EndOfStream
            if inbox.eof:
                raise anyio.EndOfStream
            await inbox.arrival()
        return inbox.take(max_bytes)

    def hold(self, item: bytes) -> bool:
        """Write ``item`` at the end of this loop turn, in one write with whatever else comes
        by then; False, and nothing held, when the transport takes no writes now (``send``
        then waits or fails)."""
        inbox = self._inbox
        if self._closing or inbox.closed or inbox.paused_writing or self._transport.is_closing():
            return False
        self._writes.hold(item)
        return True

    async def send(self, item: bytes) -> None:
        inbox = self._inbox
        if self._closing:
            raise anyio.ClosedResourceError
        if inbox.closed or self._transport.is_closing():
            raise anyio.BrokenResourceError
        self._writes.write(item)
        while inbox.paused_writing and not inbox.closed:
            await inbox.drained()
        if inbox.closed:
            raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        self._writes.flush()
        if not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()

    async def aclose(self) -> None:
        self._closing = True
        self._writes.flush()
        self._transport.close()
        await anyio.lowlevel.checkpoint()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock


class UnixListener(SocketListener):
    """A listening Unix socket whose connections come as TransportStreams."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    async def accept(self) -> SocketStream:
        client, _ = await asyncio.get_running_loop().sock_accept(self._sock)
        return await TransportStream.attach(client)

    async def aclose(self) -> None:
        self._sock.close()
        await anyio.lowlevel.checkpoint()

    @property
    def _raw_socket(self) -> socket.socket:
        return self._sock


def bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at ``path`` whose file has ``mode``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, stat.S_IMODE(mode))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock

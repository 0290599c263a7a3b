"""The asyncio AsyncClient: one connection, a reader task, requests told apart by id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from ._shared import (
    HANDSHAKE_TIMEOUT,
    cannot_connect,
    chat_message,
    check_welcome,
    client_closed,
    connection_lost,
    default_client_name,
    encode_request,
    expect,
    fail_pending,
    hello_timeout,
    lost_or_closed,
)
from .errors import RouterdError
from .paths import default_socket_path
from .protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    DaemonMessage,
    Hello,
    Reload,
    Reloaded,
    Result,
    Status,
    StatusReport,
    Welcome,
    encode_frame,
)
from .wire import (
    Answer,
    ClientProtocol,
    ConnectionFailed,
    Reply,
    answer,
    check_request_size,
    no_reply,
)

# StreamReader pauses the socket above twice this; a stream's chunks should not trip it.
_STREAM_LIMIT = 1024 * 1024

_Protocol = ClientProtocol[asyncio.Queue[Reply]]


async def _handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, name: str, protocol: _Protocol
) -> DaemonMessage | None:
    """Say Hello on a connected socket and read the reply; None if the daemon hung up.

    Done on the bare socket, not the streams: a daemon that refuses a client may hang up
    before the Hello is written, and a failed write would make a StreamReader drop the
    reply it already holds. Bytes read past the reply stay in ``protocol``.
    """
    # If the daemon already hung up, what it said before it did is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await loop.sock_sendall(sock, encode_frame(Hello(version=PROTOCOL_VERSION, client=name)))
    while (message := protocol.next_message()) is None:
        data = await loop.sock_recv(sock, protocol.frames.want())
        if not data:
            return None
        protocol.frames.feed(data)
    return message


def _discard(sock: socket.socket, writer: asyncio.StreamWriter | None) -> None:
    # Not awaited: this may be a cancellation, and the transport closes on the loop's next
    # turn either way.
    if writer is not None:
        writer.close()
    else:
        sock.close()


class _AsyncConnection:
    """One socket to the daemon after a good handshake, and the task that reads it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: _Protocol,
        welcome: Welcome,
        path: str,
    ) -> None:
        self.path = path
        self.welcome = welcome
        #: Set once no new request may start here; the client then opens a new connection.
        self.dead = False
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._pending = protocol.pending
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._read_loop(), name=f"routerd-client {path}")

    @classmethod
    async def open(cls, path: str, name: str, handshake: float, max_frame: int) -> _AsyncConnection:
        """Connect, say Hello, and return the connection once the daemon said Welcome.

        ``handshake`` bounds the connect and the Hello/Welcome exchange, in seconds.
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        writer: asyncio.StreamWriter | None = None
        protocol: _Protocol = ClientProtocol(max_frame, asyncio.Queue.put_nowait)
        try:
            async with asyncio.timeout(handshake):
                try:
                    await loop.sock_connect(sock, path)
                except OSError as exc:
                    raise cannot_connect(path, exc) from exc
                welcome = check_welcome(await _handshake(loop, sock, name, protocol), path)
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_STREAM_LIMIT)
        except TimeoutError as exc:
            _discard(sock, writer)
            raise hello_timeout(path, handshake) from exc
        except BaseException as exc:
            _discard(sock, writer)
            if isinstance(exc, ConnectionFailed):
                raise exc.failure() from exc
            if isinstance(exc, OSError):
                raise connection_lost(path) from exc
            raise
        return cls(reader, writer, protocol, welcome, path)

    # ---- requests -----------------------------------------------------------------------

    def register(self, rid: int) -> asyncio.Queue[Reply]:
        """Make a queue that will receive the replies for ``rid``."""
        if self.dead:
            raise lost_or_closed(self._closing, self.path)
        replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._pending[rid] = replies
        return replies

    async def send(self, rid: int, frame: bytes) -> None:
        """Send one registered request's frame; on failure it is forgotten (and cancelled
        once written). write() takes the whole frame: frames never interleave."""
        written = False
        try:
            check_request_size(frame, self.welcome)
            if self.dead or self._writer.is_closing():
                raise lost_or_closed(self._closing, self.path)
            self._writer.write(frame)
            written = True
            await self._writer.drain()
        except OSError as exc:
            self.dead = True  # the next request opens another, before the reader task runs
            self._pending.pop(rid, None)
            raise lost_or_closed(self._closing, self.path) from exc
        except BaseException:
            # Once written, the frame is on its way: the daemon must drop it too.
            self.cancel(rid) if written else self._pending.pop(rid, None)
            raise

    @staticmethod
    async def wait(replies: asyncio.Queue[Reply], per_frame: float | None) -> Answer:
        """The next message for a request, waiting at most ``per_frame`` seconds for it;
        a daemon Error or a failure is raised."""
        if per_frame is None:
            item = await replies.get()
        else:
            try:
                async with asyncio.timeout(per_frame):
                    item = await replies.get()
            except TimeoutError:
                raise no_reply(per_frame) from None
        return answer(item)

    def cancel(self, rid: int) -> None:
        """Stop waiting for ``rid`` and, if the daemon still works on it, send Cancel.

        Synchronous, so a task being cancelled can still tell the daemon from its ``finally``.
        """
        if self._pending.pop(rid, None) is None or self.dead:
            return
        with contextlib.suppress(Exception):
            self._writer.write(encode_frame(Cancel(id=rid)))

    def cancel_soon(self, rid: int) -> None:
        """cancel() from a finalizer: it may run inside the transport's own code, or in
        another thread, so the write is left for the loop's next turn."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self.cancel, rid)

    # ---- the reader task ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        read = self._reader.read
        protocol = self._protocol
        receive_data = protocol.receive_data
        frames = protocol.frames
        failure: Callable[[], RouterdError] | None = None
        try:
            while data := await read(frames.want()):
                receive_data(data)
        except ConnectionFailed as exc:
            failure = exc.failure
        except OSError:
            pass  # the daemon reset the connection
        finally:
            self.dead = True
            fail_pending(protocol, self._closing, self.path, failure)
            if not self._closing:
                # Nobody can use this connection again; free the socket without waiting
                # for the client to notice.
                self._writer.close()

    async def aclose(self) -> None:
        """Fail what is pending, stop the reader task and close the socket."""
        self._closing = True
        self.dead = True
        self._writer.close()
        self._task.cancel()
        # asyncio.wait rather than awaiting the task: its CancelledError is ours to expect,
        # while a cancellation of the caller must still propagate.
        await asyncio.wait([self._task])
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class AsyncChatStream:
    """The chunks of one streamed reply; ``result`` holds the final Result once it is over.

    The request is sent on ``async with`` or on the first ``__anext__``. Leaving early —
    ``break``, ``aclose()``, or the ``async with`` block — sends Cancel, so the daemon
    cancels the upstream call.
    """

    def __init__(self, client: AsyncClient, rid: int, frame: bytes) -> None:
        self.id = rid
        #: The final Result, set when the iteration ends normally.
        self.result: Result | None = None
        self._client = client
        self._frame = frame
        self._conn: _AsyncConnection | None = None
        self._replies: asyncio.Queue[Reply] | None = None
        self._done = False

    async def _start(self) -> asyncio.Queue[Reply]:
        try:
            conn = await self._client._connection()
            replies = conn.register(self.id)
            await conn.send(self.id, self._frame)
        except BaseException:
            self._done = True
            raise
        self._conn = conn
        self._replies = replies
        return replies

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        replies = self._replies if self._replies is not None else await self._start()
        try:
            message = await _AsyncConnection.wait(replies, self._client.timeout)
        except BaseException:
            self._stop()
            raise
        if isinstance(message, Chunk):
            return message
        self._done = True
        self.result = expect(message, Result, "chunk or result")
        raise StopAsyncIteration

    def _stop(self) -> None:
        if not self._done:
            self._done = True
            if self._conn is not None:
                self._conn.cancel(self.id)

    async def aclose(self) -> None:
        """Stop the stream; the daemon is told to cancel it if it is still running."""
        self._stop()

    async def __aenter__(self) -> Self:
        if self._replies is None and not self._done:
            await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def __del__(self) -> None:
        # ``async for chunk in stream: break`` calls nothing on a plain async iterator; the
        # refcount drop that follows is the one chance to stop a paid upstream call.
        conn = getattr(self, "_conn", None)
        if conn is not None and not self._done:
            self._done = True
            conn.cancel_soon(self.id)


class AsyncClient:
    """An asyncio routerd client; one connection shared by every task that uses it.

    ``path`` defaults to :func:`default_socket_path`. ``timeout`` bounds the connect and the
    wait for each reply frame (a chat's result, a stream's next chunk); None waits as long as
    the daemon takes, which enforces each request's deadline itself. The connection opens on
    ``async with`` or on first use, and is reopened by the next request after the daemon
    drops it.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = path if path is not None else default_socket_path()
        self.name = name or default_client_name()
        self.timeout = timeout
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._conn: _AsyncConnection | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False

    async def connect(self) -> None:
        """Open the connection now rather than on the first request."""
        await self._connection()

    async def _connection(self) -> _AsyncConnection:
        conn = self._conn
        if conn is not None and not conn.dead:
            return conn
        async with self._connect_lock:
            if self._closed:
                raise client_closed()
            conn = self._conn
            if conn is None or conn.dead:
                if conn is not None:
                    self._conn = None
                    await conn.aclose()
                handshake = self.timeout if self.timeout is not None else HANDSHAKE_TIMEOUT
                conn = await _AsyncConnection.open(self.path, self.name, handshake, self.max_frame)
                if self._closed:
                    # aclose() ran while we connected; it cannot have seen this connection.
                    await conn.aclose()
                    raise client_closed()
                self._conn = conn
            return conn

    async def _request(self, rid: int, frame: bytes) -> Answer:
        conn = await self._connection()
        replies = conn.register(rid)
        await conn.send(rid, frame)
        try:
            return await conn.wait(replies, self.timeout)
        except BaseException:
            conn.cancel(rid)
            raise

    async def chat(
        self,
        route: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        deadline: float | None = None,
        priority: int = 0,
        session: str | None = None,
        **params: Any,
    ) -> Result:
        """Send one chat request on ``route`` and wait for its Result.

        ``params`` are OpenAI chat parameters (max_tokens, temperature, tools, stop, ...).
        ``deadline`` is seconds from now (None: the route's); a higher ``priority`` is served
        first when requests wait for capacity; ``session`` keeps a conversation on the key
        whose prompt cache holds it. Failures raise a RouterdError subclass.
        """
        rid = next(self._ids)
        message = chat_message(rid, route, messages, deadline, priority, params, False, session)
        return expect(await self._request(rid, encode_request(message)), Result, "result")

    def stream(
        self,
        route: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        deadline: float | None = None,
        priority: int = 0,
        session: str | None = None,
        **params: Any,
    ) -> AsyncChatStream:
        """A streamed chat request; ``async for`` over it yields Chunks (see AsyncChatStream)."""
        rid = next(self._ids)
        message = chat_message(rid, route, messages, deadline, priority, params, True, session)
        return AsyncChatStream(self, rid, encode_request(message))

    async def status(self) -> StatusReport:
        """The daemon's pool health: the same data as ``routerd status --json``."""
        rid = next(self._ids)
        reply = await self._request(rid, encode_frame(Status(id=rid)))
        return expect(reply, StatusReport, "status_report")

    async def reload(self) -> str:
        """Make the daemon re-read its config (as SIGHUP does); returns what it did.

        Raises ConfigRejected (every problem listed) when the config has errors, Forbidden
        when this user is not the daemon's own or root.
        """
        rid = next(self._ids)
        reply = await self._request(rid, encode_frame(Reload(id=rid)))
        return expect(reply, Reloaded, "reloaded").summary

    async def aclose(self) -> None:
        """Close the connection; requests still waiting raise Unavailable."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

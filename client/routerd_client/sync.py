"""The blocking, thread-safe Client: one connection, a reader thread, requests told apart by id."""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
from collections import deque
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

_Protocol = ClientProtocol[queue.SimpleQueue[Reply]]


def _first_message(sock: socket.socket, protocol: _Protocol) -> DaemonMessage | None:
    """Read until one whole message is in; None if the daemon hung up first."""
    while (message := protocol.next_message()) is None:
        data = sock.recv(protocol.frames.want())
        if not data:
            return None
        protocol.frames.feed(data)
    return message


class _Connection:
    """One socket to the daemon after a good handshake, and the thread that reads it."""

    def __init__(
        self, sock: socket.socket, protocol: _Protocol, welcome: Welcome, path: str
    ) -> None:
        self.path = path
        self.welcome = welcome
        #: Set once no new request may start here; the Client then opens a new connection.
        self.dead = False
        self._sock = sock
        self._protocol = protocol
        self._pending = protocol.pending
        self._send_lock = threading.Lock()
        # Cancels that found the send lock taken; whoever holds it sends them (see cancel()).
        self._cancels: deque[int] = deque()
        self._closing = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"routerd-client {path}", daemon=True
        )
        self._reader.start()

    @classmethod
    def open(cls, path: str, name: str, timeout: float | None, max_frame: int) -> _Connection:
        """Connect, say Hello, and return the connection once the daemon said Welcome."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        handshake = timeout if timeout is not None else HANDSHAKE_TIMEOUT
        protocol: _Protocol = ClientProtocol(max_frame, queue.SimpleQueue.put)
        try:
            sock.settimeout(handshake)
            try:
                sock.connect(path)
            except OSError as exc:
                raise cannot_connect(path, exc) from exc
            try:
                # If the daemon already hung up, what it said before it did is still there
                # to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(encode_frame(Hello(version=PROTOCOL_VERSION, client=name)))
                welcome = check_welcome(_first_message(sock, protocol), path)
            except TimeoutError as exc:
                raise hello_timeout(path, handshake) from exc
            except ConnectionFailed as exc:
                raise exc.failure() from exc
            except OSError as exc:
                raise connection_lost(path) from exc
            # The reader thread blocks in recv for as long as the connection lives.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return cls(sock, protocol, welcome, path)

    # ---- requests -----------------------------------------------------------------------

    def register(self, rid: int) -> queue.SimpleQueue[Reply]:
        """Make a queue that will receive the replies for ``rid``."""
        if self.dead:
            raise lost_or_closed(self._closing, self.path)
        replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        self._pending[rid] = replies
        # The reader sets ``dead`` before it drains, so a request that sees it still False
        # here is certain to be drained (and failed) if the connection goes.
        if self.dead:
            self._pending.pop(rid, None)
            raise lost_or_closed(self._closing, self.path)
        return replies

    def send(self, rid: int, frame: bytes) -> None:
        """Send one registered request's frame; on failure the request is forgotten."""
        try:
            check_request_size(frame, self.welcome)
        except BaseException:
            self._pending.pop(rid, None)
            raise
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except BaseException as exc:
            # Part of the frame may be out (a broken pipe, a KeyboardInterrupt): nothing can
            # follow it on this socket, so the connection ends and the next request opens
            # another.
            self._pending.pop(rid, None)
            self.dead = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if isinstance(exc, OSError):
                raise lost_or_closed(self._closing, self.path) from exc
            raise
        if self._cancels:
            self._flush_cancels()

    @staticmethod
    def wait(replies: queue.SimpleQueue[Reply], timeout: float | None) -> Answer:
        """The next message for a request; a daemon Error or a failure is raised."""
        try:
            item = replies.get(timeout=timeout)
        except queue.Empty:
            raise no_reply(timeout) from None
        return answer(item)

    def cancel(self, rid: int) -> None:
        """Stop waiting for ``rid`` and, if the daemon still works on it, send Cancel.

        Never blocks, so it is safe from ``__del__`` in any thread: when another thread holds
        the send lock, the id is left in ``_cancels`` for that thread to send.
        """
        if self._pending.pop(rid, None) is None or self.dead:
            return
        # Append before trying the lock: a holder that releases after our failed attempt is
        # then sure to see the id when it checks the deque.
        self._cancels.append(rid)
        self._flush_cancels()

    def _flush_cancels(self) -> None:
        while self._cancels and self._send_lock.acquire(blocking=False):
            try:
                frames = []
                while self._cancels:
                    frames.append(encode_frame(Cancel(id=self._cancels.popleft())))
                self._sock.sendall(b"".join(frames))
            except OSError:
                pass  # the reader sees the connection go and fails whoever still waits
            finally:
                self._send_lock.release()

    # ---- the reader thread --------------------------------------------------------------

    def _read_loop(self) -> None:
        recv = self._sock.recv
        protocol = self._protocol
        receive_data = protocol.receive_data
        frames = protocol.frames
        failure: Callable[[], RouterdError] | None = None
        try:
            while data := recv(frames.want()):
                receive_data(data)
        except ConnectionFailed as exc:
            failure = exc.failure
        except (OSError, ValueError):
            pass  # recv on a socket shut down or closed under us: the connection is gone
        finally:
            self.dead = True
            fail_pending(protocol, self._closing, self.path, failure)

    def close(self) -> None:
        """Fail what is pending, stop the reader thread and close the socket."""
        self._closing = True
        self.dead = True
        # Wakes the reader out of recv and any sender out of a blocked sendall.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not threading.current_thread():
            self._reader.join()
        # Closing under a sender's feet could hand its fd number to another socket.
        with self._send_lock:
            self._sock.close()


class ChatStream:
    """The chunks of one streamed reply; ``result`` holds the final Result once it is over.

    Leaving early — ``break``, ``close()``, or the ``with`` block — sends Cancel, so the
    daemon cancels the upstream call.
    """

    def __init__(self, conn: _Connection, rid: int, timeout: float | None) -> None:
        self.id = rid
        #: The final Result, set when the iteration ends normally.
        self.result: Result | None = None
        self._conn = conn
        self._timeout = timeout
        self._replies = conn.register(rid)
        self._done = False

    def _send(self, frame: bytes) -> None:
        try:
            self._conn.send(self.id, frame)
        except BaseException:
            self._done = True
            raise

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            message = self._conn.wait(self._replies, self._timeout)
        except BaseException:
            self.close()
            raise
        if isinstance(message, Chunk):
            return message
        self._done = True
        self.result = expect(message, Result, "chunk or result")
        raise StopIteration

    def close(self) -> None:
        """Stop the stream; the daemon is told to cancel it if it is still running."""
        if not self._done:
            self._done = True
            self._conn.cancel(self.id)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # ``for chunk in stream: break`` calls nothing on a plain iterator; the refcount drop
        # that follows is the one chance to stop a paid upstream call.
        if not getattr(self, "_done", True):
            with contextlib.suppress(Exception):
                self.close()


class Client:
    """A blocking routerd client; one connection shared by every thread that uses it.

    ``path`` defaults to :func:`default_socket_path`. ``timeout`` bounds the connect and the
    wait for each reply frame (a chat's result, a stream's next chunk); None waits as long as
    the daemon takes, which enforces each request's deadline itself. The connection opens on
    ``with`` or on first use, and is reopened by the next request after the daemon drops it.
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
        self._conn: _Connection | None = None
        self._connect_lock = threading.Lock()
        self._closed = False

    def connect(self) -> None:
        """Open the connection now rather than on the first request."""
        self._connection()

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.dead:
            return conn
        with self._connect_lock:
            if self._closed:
                raise client_closed()
            conn = self._conn
            if conn is None or conn.dead:
                if conn is not None:
                    conn.close()
                conn = self._conn = _Connection.open(
                    self.path, self.name, self.timeout, self.max_frame
                )
            return conn

    def _request(self, rid: int, frame: bytes) -> Answer:
        """Send one request's frame and wait for its single reply (raised if an Error)."""
        conn = self._connection()
        replies = conn.register(rid)
        conn.send(rid, frame)
        try:
            return conn.wait(replies, self.timeout)
        except BaseException:
            conn.cancel(rid)
            raise

    def chat(
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
        frame = encode_request(
            chat_message(rid, route, messages, deadline, priority, params, False, session)
        )
        return expect(self._request(rid, frame), Result, "result")

    def stream(
        self,
        route: str,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        deadline: float | None = None,
        priority: int = 0,
        session: str | None = None,
        **params: Any,
    ) -> ChatStream:
        """Send one streamed chat request; iterate the returned ChatStream for its Chunks."""
        rid = next(self._ids)
        frame = encode_request(
            chat_message(rid, route, messages, deadline, priority, params, True, session)
        )
        stream = ChatStream(self._connection(), rid, self.timeout)
        stream._send(frame)
        return stream

    def status(self) -> StatusReport:
        """The daemon's pool health: the same data as ``routerd status --json``."""
        rid = next(self._ids)
        message = self._request(rid, encode_frame(Status(id=rid)))
        return expect(message, StatusReport, "status_report")

    def reload(self) -> str:
        """Make the daemon re-read its config (as SIGHUP does); returns what it did.

        Raises ConfigRejected (every problem listed) when the config has errors, Forbidden
        when this user is not the daemon's own or root.
        """
        rid = next(self._ids)
        message = self._request(rid, encode_frame(Reload(id=rid)))
        return expect(message, Reloaded, "reloaded").summary

    def close(self) -> None:
        """Close the connection; requests still waiting raise Unavailable."""
        with self._connect_lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __del__(self) -> None:
        # Dropped without close(): the reader thread would hold the socket open for good.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

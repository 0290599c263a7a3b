"""The msgpack Unix-socket server: one task per connection, one task per request on it.

A corrupt frame gets an Error frame and closes that connection only; a well-formed message
that breaks the schema or the request bounds gets a typed Error and the connection stays.
A request is cancelled by a Cancel frame or when its client goes away, and its upstream
call with it. Whenever the daemon ends a connection itself, it says why in an Error frame
and gives the client a moment to read it before the socket closes.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import SocketListener, SocketStream, TaskGroup
from routerd_client.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chat,
    Chunk,
    DaemonMessage,
    Error,
    FrameTooLarge,
    Hello,
    Reload,
    Status,
    StatusReport,
    Welcome,
    client_decoder,
    encode_frame,
)

from routerd.core.calls import Delta
from routerd.core.errors import Refused
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.budget import BudgetExhausted, BufferBudget
from routerd.fronts.msgpack.accept import Handler, serve_listener
from routerd.fronts.msgpack.framing import FrameReader, FrameStalled
from routerd.fronts.msgpack.guard import MAX_DEPTH, check_chat, check_messages, peek_id
from routerd.fronts.msgpack.replies import error_message, result_message
from routerd.fronts.msgpack.stream import TransportStream
from routerd.fronts.peers import Peer, PeerPolicy, peer_of
from routerd.fronts.tasks import RequestTasks

log = structlog.get_logger("routerd.server")

HELLO_TIMEOUT_S = 10.0
#: After its Error frame, how long a connection the daemon ends waits for the client to
#: close its side. Closing with the client's bytes unread makes the kernel reset the
#: connection, and a client still writing (its Hello, say) then loses the Error.
LINGER_S = 2.0
#: How long a connection over the cap may take to send its Hello, and to take the Error.
TURN_AWAY_S = 1.0
#: How long a request cut off by the shutdown may take to be told so.
FAREWELL_S = 1.0
SHUTDOWN_MESSAGE = "routerd is shutting down; the request was not finished"
_any_decoder = msgspec.msgpack.Decoder()
_conn_ids = itertools.count(1)


class _HangUp(Exception):
    """The connection must end; ``error`` tells the client why."""

    def __init__(
        self, message: str, kind: str = "protocol_error", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.error = Error(None, kind, message, retry_after)


def _encode(message: DaemonMessage) -> bytes | None:
    """The frame for ``message``, or None when it cannot be encoded."""
    try:
        return encode_frame(message)
    except (msgspec.EncodeError, OverflowError, TypeError, ValueError, RecursionError) as exc:
        log.error(
            "reply_unencodable",
            reply=type(message).__name__,
            id=getattr(message, "id", None),
            error=type(exc).__name__,
        )
        return None


async def linger_and_close(stream: SocketStream, linger_s: float = LINGER_S) -> None:
    """End our side, read (and drop) what the client still sends until it closes, close.

    The client then reads everything the daemon wrote, whatever it was writing meanwhile.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(linger_s):
        try:
            await stream.send_eof()
            while True:
                await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except OSError:
            pass  # shutdown() on a socket the client has already reset
    with anyio.CancelScope(shield=True):
        await stream.aclose()


async def refuse_connection(stream: SocketStream, max_connections: int) -> None:
    """Tell a connection over the cap why it cannot stay, then close it.

    The client's Hello is read first (for a moment at most): closed with it unread, or
    before it arrives, the connection would be reset and the client could lose the Error.
    Not lingering any longer keeps a flood from holding descriptors.
    """
    frame = encode_frame(
        Error(
            None,
            "unavailable",
            f"routerd has too many connections open (server.max_connections = "
            f"{max_connections}); close idle clients or try again later",
            retry_after=1.0,
        )
    )
    try:
        with anyio.move_on_after(TURN_AWAY_S):
            await stream.receive()
        with anyio.move_on_after(TURN_AWAY_S):
            await stream.send(frame)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


async def serve_clients(
    listener: SocketListener, handler: Handler, *, max_connections: int, task_group: TaskGroup
) -> None:
    """The msgpack socket's accept loop (see ``serve_listener``); past ``max_connections``
    a new client is told so in an Error frame."""

    async def turn_away(stream: SocketStream) -> None:
        await refuse_connection(stream, max_connections)

    await serve_listener(
        listener,
        handler,
        max_connections=max_connections,
        task_group=task_group,
        turn_away=turn_away,
    )


def _chat_crashed(conn_id: int, exc: BaseException) -> None:
    log.error("request_crashed", conn=conn_id, exc_info=exc)


class Connection:
    """One client connection: reads frames, runs requests, writes replies.

    ``budget`` is the daemon's BufferBudget and ``read_timeout_s`` bounds a frame that has
    begun (see FrameReader). The dispatcher knows the sender by its peer's pid when the
    kernel says it, else by this connection.
    """

    def __init__(
        self,
        stream: SocketStream,
        dispatcher: Dispatcher,
        *,
        max_frame: int,
        status: Callable[[int], StatusReport],
        draining: Callable[[], bool],
        version: str,
        budget: BufferBudget,
        read_timeout_s: float,
        peers: PeerPolicy | None = None,
        reload: Callable[[int], Awaitable[DaemonMessage]] | None = None,
    ) -> None:
        self.id = next(_conn_ids)
        self.stream = stream
        self.frames = FrameReader(
            stream, max_frame=max_frame, budget=budget, read_timeout_s=read_timeout_s
        )
        self.dispatcher = dispatcher
        self.max_frame = max_frame
        self.status = status
        self.draining = draining
        self.version = version
        self.peers = peers
        self.reload = reload
        self.peer: Peer | None = None
        self.client = ""
        #: Who the dispatcher's fairness sees: the peer process, else this connection.
        self.sender = f"conn:{self.id}"
        self.requests: dict[int, anyio.CancelScope] = {}
        self._raw: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._closed = False
        # Set when the connection ends by its own decision (the client left, or sent bytes
        # that cannot be trusted), as opposed to being cancelled by the daemon's shutdown.
        self._hanging_up = False
        # Requests whose reply could not be encoded: they were answered with an Error.
        self._failed: set[int] = set()
        # The Chat requests running, which serve() cancels and awaits before the connection
        # closes (a request cancelled by the daemon's shutdown still tells its client so,
        # see _run_chat).
        # (Told of a crash by the connection's id, not by a method of the connection: the
        # tasks would hold the connection, and its buffers, in a cycle after it ended.)
        self._chats = RequestTasks(partial(_chat_crashed, self.id))

    async def send(self, message: DaemonMessage, *, soon: bool = False) -> None:
        """Write one frame; a client that went away just ends the writer.

        A message that cannot be encoded becomes an ``internal`` Error for its request, so
        one bad reply never costs the connection. The frame goes into the transport at once
        (with ``soon``: at the end of the loop turn, see ``TransportStream.hold``), in order
        with every other; only a client that stops reading makes the writer wait.
        """
        if self._closed:
            return
        frame = _encode(message)
        if frame is None:
            frame = self._unencodable(message)
        elif soon and isinstance(self.stream, TransportStream) and self.stream.hold(frame):
            return
        try:
            await self.stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._closed = True

    def _unencodable(self, message: DaemonMessage) -> bytes:
        request_id: int | None = getattr(message, "id", None)
        if request_id is not None and request_id in self.requests:
            # The client now holds a final answer for this id: the request must stop.
            self._failed.add(request_id)
            self.requests[request_id].cancel()
        return encode_frame(
            Error(request_id, "internal", "routerd could not encode its reply to this request")
        )

    async def _read_frame(self) -> bytes | bytearray:
        try:
            return await self.frames.read()
        except FrameStalled as exc:
            raise _HangUp(str(exc)) from None
        except BudgetExhausted as exc:
            raise _HangUp(str(exc), "unavailable", retry_after=1.0) from None

    def _decode(self, body: bytes | bytearray) -> Any:
        """A message, or an Error to reply with (schema broken, connection kept).

        Raises _HangUp when the bytes are not msgpack at all, or the message names no id
        an error could answer.
        """
        # msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
        try:
            return client_decoder.decode(body)
        except msgspec.ValidationError as exc:
            try:
                raw = _any_decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                raise _HangUp(f"undecodable frame: {exc}") from None
            except RecursionError:
                raw = {"id": peek_id(body)}
            request_id = raw.get("id") if isinstance(raw, dict) else None
            if type(request_id) is not int:  # not a bool either: it would not encode as an id
                # An Error without an id speaks for the whole connection, and clients drop
                # the connection on one: so does the daemon.
                raise _HangUp(f"invalid message: {exc}") from None
            return Error(request_id, "protocol_error", f"invalid message: {exc}")
        except RecursionError:
            # msgspec stops at Python's recursion limit; the frame boundary is still sound.
            request_id = peek_id(body)
            message = f"the message is nested deeper than {MAX_DEPTH} levels"
            if request_id is None:
                raise _HangUp(message) from None
            return Error(request_id, "bad_request", message)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _HangUp(f"corrupt frame: {exc}") from None

    async def serve(self) -> None:
        """Run the connection until the client leaves or sends bytes that cannot be trusted."""
        peer = self.peer = None if self._raw is None else peer_of(self._raw)
        if peer is not None and peer.pid > 0:
            self.sender = f"pid:{peer.pid}"
        farewell: Error | None = None
        try:
            if self.peers is not None and not self.peers.allows(peer):
                log.warning("peer_refused", conn=self.id, peer=peer)
                farewell = Error(None, "forbidden", self.peers.refusal(peer))
                return
            async with anyio.create_task_group() as requests:
                try:
                    await self._handshake()
                    log.debug("client_connected", conn=self.id, client=self.client, peer=peer)
                    while True:
                        body = await self._read_frame()
                        message = self._decode(body)
                        await self._handle(message, requests)
                except FrameTooLarge as exc:
                    farewell = Error(None, "protocol_error", str(exc))
                except _HangUp as exc:
                    farewell = exc.error
                except (
                    anyio.EndOfStream,
                    anyio.IncompleteRead,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                ):
                    pass
                # Reached only when the connection ends on its own, not when it is cancelled.
                self._hanging_up = True
                # The client is gone or untrusted: its requests and their upstream calls end.
                requests.cancel_scope.cancel()
        finally:
            self.frames.close()
            with anyio.CancelScope(shield=True):
                self._chats.cancel()
                await self._chats.ended()
                if farewell is not None:
                    with anyio.move_on_after(LINGER_S):  # a client that reads nothing
                        await self.send(farewell)
                    # The transport sends our end of stream after every pending write.
                    self._closed = True
                    await linger_and_close(self.stream)
                self._closed = True
                await self.stream.aclose()
            log.debug("client_disconnected", conn=self.id, client=self.client)

    async def _handshake(self) -> None:
        with anyio.move_on_after(HELLO_TIMEOUT_S):
            body = await self._read_frame()
            message = self._decode(body)
            if not isinstance(message, Hello):
                raise _HangUp("the first frame must be a Hello")
            if message.version != PROTOCOL_VERSION:
                raise _HangUp(
                    f"protocol version {message.version} is not supported: "
                    f"this routerd speaks version {PROTOCOL_VERSION}; "
                    "upgrade routerd-client or routerd so they match"
                )
            self.client = message.client
            await self.send(Welcome(PROTOCOL_VERSION, f"routerd {self.version}", self.max_frame))
            return
        raise _HangUp(f"no Hello within {HELLO_TIMEOUT_S:g} s")

    async def _handle(self, message: Any, requests: anyio.abc.TaskGroup) -> None:
        if isinstance(message, Chat):
            if message.id in self.requests:
                await self.send(
                    Error(message.id, "protocol_error", f"request id {message.id} is in use")
                )
                return
            problem = check_chat(message) or check_messages(message)
            if problem is not None:
                self.dispatcher.refused("bad_request")
                await self.send(Error(message.id, "bad_request", problem))
                return
            if self.draining():
                await self.send(
                    Error(message.id, "unavailable", "routerd is shutting down", retry_after=1.0)
                )
                return
            scope = anyio.CancelScope()
            self.requests[message.id] = scope
            self._chats.spawn(self._run_chat(message, scope))
        elif isinstance(message, Cancel):
            running = self.requests.get(message.id)
            if running is not None:
                running.cancel()
        elif isinstance(message, Status):
            await self.send(self.status(message.id))
        elif isinstance(message, Reload):
            requests.start_soon(self._run_reload, message.id)
        elif isinstance(message, Error):
            await self.send(message)
        else:
            # A second Hello: the client lost track of the connection's state.
            raise _HangUp(f"unexpected {type(message).__name__} frame")

    async def _run_reload(self, request_id: int) -> None:
        # Changing the config is the operator's: the daemon's own user, or root.
        peer = self.peer
        if peer is None or peer.uid not in (0, os.getuid()):
            who = "an unknown peer" if peer is None else f"uid {peer.uid}"
            message = f"{who} may not reload routerd: only its own user or root may"
            await self.send(Error(request_id, "forbidden", message))
        elif self.reload is None:
            await self.send(Error(request_id, "unavailable", "this routerd cannot reload"))
        else:
            await self.send(await self.reload(request_id))

    async def _run_chat(self, chat: Chat, scope: anyio.CancelScope) -> None:
        request_id = chat.id
        on_delta = None
        if chat.stream:
            first = True

            async def on_delta(delta: Delta) -> None:
                nonlocal first
                chunk = Chunk(request_id, delta.text, delta.tool_calls, delta.finish_reason)
                await self.send(chunk, soon=not first)  # the first chunk goes at once
                first = False

        try:
            with scope:
                try:
                    reply = await self.dispatcher.chat(
                        chat.route,
                        chat.request,
                        stream=chat.stream,
                        deadline=chat.deadline,
                        priority=chat.priority,
                        on_delta=on_delta,
                        client=self.sender,
                        session=chat.session,
                    )
                except Refused as refused:
                    await self.send(error_message(request_id, refused))
                    return
                except Exception:
                    log.exception("request_crashed", conn=self.id, id=request_id)
                    await self.send(Error(request_id, "internal", "routerd failed on this request"))
                    return
                await self.send(result_message(request_id, reply))
            if scope.cancelled_caught and request_id not in self._failed:
                await self.send(Error(request_id, "cancelled", "request cancelled by the client"))
        except anyio.get_cancelled_exc_class():
            if not self._hanging_up and self.draining():
                # The drain timed out: the client would otherwise see only end of stream.
                with anyio.move_on_after(FAREWELL_S, shield=True):
                    await self.send(Error(request_id, "unavailable", SHUTDOWN_MESSAGE, 1.0))
            raise
        finally:
            self.requests.pop(request_id, None)
            self._failed.discard(request_id)

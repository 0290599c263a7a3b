"""The msgpack Unix-socket server: one task per connection, one task per request on it.

A corrupt frame gets an Error frame and closes that connection only; a well-formed message
that breaks the schema gets a typed Error and the connection stays. A request is cancelled
by a Cancel frame or when its client goes away, and its upstream call with it.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from routerd_client.errors import RouterdError
from routerd_client.protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Cancel,
    Chat,
    Chunk,
    DaemonMessage,
    Error,
    FrameTooLarge,
    Hello,
    Result,
    Status,
    StatusReport,
    Welcome,
    client_decoder,
    encode_frame,
    frame_length,
)

from routerd.dispatch import Dispatcher
from routerd.peers import PeerPolicy, peer_of
from routerd.upstream.base import Delta

log = structlog.get_logger("routerd.server")

HELLO_TIMEOUT_S = 10.0
_any_decoder = msgspec.msgpack.Decoder()
_conn_ids = itertools.count(1)


class _Corrupt(Exception):
    """The byte stream can no longer be trusted; the connection must close."""


class Connection:
    """One client connection: reads frames, runs requests, writes replies."""

    def __init__(
        self,
        stream: SocketStream,
        dispatcher: Dispatcher,
        *,
        max_frame: int,
        status: Callable[[int], StatusReport],
        draining: Callable[[], bool],
        version: str,
        peers: PeerPolicy | None = None,
    ) -> None:
        self.id = next(_conn_ids)
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.dispatcher = dispatcher
        self.max_frame = max_frame
        self.status = status
        self.draining = draining
        self.version = version
        self.peers = peers
        self.client = ""
        self.requests: dict[int, anyio.CancelScope] = {}
        self._lock = anyio.Lock(fast_acquire=True)
        self._raw: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._closed = False

    async def send(self, message: DaemonMessage) -> None:
        """Write one frame; a client that went away just ends the writer.

        Hot path: when no other write is pending, the frame goes straight into the socket's
        buffer, which costs no trip through the event loop (anyio's send always yields once
        first). Only what does not fit waits, in order, under the lock.
        """
        if self._closed:
            return
        frame = encode_frame(message)
        if self._raw is not None and not self._lock.locked():
            try:
                sent = self._raw.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._closed = True
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        async with self._lock:
            try:
                await self.stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._closed = True

    async def _read_frame(self) -> bytes:
        header = await self.reader.receive_exactly(HEADER_SIZE)
        size = frame_length(header, self.max_frame)
        return await self.reader.receive_exactly(size)

    def _decode(self, body: bytes) -> Any:
        """A message, or an Error to reply with (schema broken, connection kept).

        Raises _Corrupt when the bytes are not msgpack at all, or the message names no id
        an error could answer.
        """
        # msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
        try:
            return client_decoder.decode(body)
        except msgspec.ValidationError as exc:
            request_id: int | None = None
            try:
                raw = _any_decoder.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                raise _Corrupt(f"undecodable frame: {exc}") from None
            if isinstance(raw, dict) and isinstance(raw.get("id"), int):
                request_id = raw["id"]
            if request_id is None:
                # An Error without an id speaks for the whole connection, and clients drop
                # the connection on one: so does the daemon.
                raise _Corrupt(f"invalid message: {exc}") from None
            return Error(id=request_id, kind="protocol_error", message=f"invalid message: {exc}")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _Corrupt(f"corrupt frame: {exc}") from None

    async def serve(self) -> None:
        """Run the connection until the client leaves or sends bytes that cannot be trusted."""
        peer = None if self._raw is None else peer_of(self._raw)
        try:
            if self.peers is not None and not self.peers.allows(peer):
                log.warning("peer_refused", conn=self.id, peer=peer)
                await self.send(Error(None, "forbidden", self.peers.refusal(peer)))
                return
            async with anyio.create_task_group() as requests:
                try:
                    if not await self._handshake():
                        return
                    log.debug("client_connected", conn=self.id, client=self.client, peer=peer)
                    while True:
                        body = await self._read_frame()
                        message = self._decode(body)
                        await self._handle(message, requests)
                except (FrameTooLarge, _Corrupt) as exc:
                    await self.send(Error(id=None, kind="protocol_error", message=str(exc)))
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    pass
                finally:
                    # The client is gone or untrusted: its requests and their upstream calls end.
                    requests.cancel_scope.cancel()
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()
            log.debug("client_disconnected", conn=self.id, client=self.client)

    async def _handshake(self) -> bool:
        with anyio.move_on_after(HELLO_TIMEOUT_S):
            body = await self._read_frame()
            message = self._decode(body)
            if isinstance(message, Hello):
                if message.version != PROTOCOL_VERSION:
                    await self.send(
                        Error(
                            id=None,
                            kind="protocol_error",
                            message=f"protocol version {message.version} is not supported: "
                            f"this routerd speaks version {PROTOCOL_VERSION}; "
                            "upgrade routerd-client or routerd so they match",
                        )
                    )
                    return False
                self.client = message.client
                await self.send(
                    Welcome(PROTOCOL_VERSION, f"routerd {self.version}", self.max_frame)
                )
                return True
            await self.send(
                Error(id=None, kind="protocol_error", message="the first frame must be a Hello")
            )
            return False
        await self.send(Error(id=None, kind="protocol_error", message="no Hello within 10 s"))
        return False

    async def _handle(self, message: Any, requests: anyio.abc.TaskGroup) -> None:
        if isinstance(message, Chat):
            if message.id in self.requests:
                await self.send(
                    Error(message.id, "protocol_error", f"request id {message.id} is in use")
                )
                return
            if self.draining():
                await self.send(
                    Error(message.id, "unavailable", "routerd is shutting down", retry_after=1.0)
                )
                return
            scope = anyio.CancelScope()
            self.requests[message.id] = scope
            requests.start_soon(self._run_chat, message, scope)
        elif isinstance(message, Cancel):
            running = self.requests.get(message.id)
            if running is not None:
                running.cancel()
        elif isinstance(message, Status):
            await self.send(self.status(message.id))
        elif isinstance(message, Error):
            await self.send(message)
        else:
            # A second Hello: the client lost track of the connection's state.
            raise _Corrupt(f"unexpected {type(message).__name__} frame")

    async def _run_chat(self, chat: Chat, scope: anyio.CancelScope) -> None:
        request_id = chat.id
        on_delta = None
        if chat.stream:

            async def on_delta(delta: Delta) -> None:
                await self.send(
                    Chunk(request_id, delta.text, delta.tool_calls, delta.finish_reason)
                )

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
                    )
                except RouterdError as exc:
                    await self.send(
                        Error(
                            request_id,
                            exc.kind,
                            exc.message,
                            exc.retry_after,
                            exc.attempts,
                            exc.details,
                        )
                    )
                    return
                except Exception:
                    log.exception("request_crashed", conn=self.id, id=request_id)
                    await self.send(Error(request_id, "internal", "routerd failed on this request"))
                    return
                await self.send(
                    Result(
                        id=request_id,
                        text=reply.text,
                        model=reply.model,
                        provider=reply.provider,
                        credential=reply.credential,
                        target=reply.target,
                        usage=reply.usage,
                        attempts=reply.attempts,
                        finish_reason=reply.finish_reason,
                        tool_calls=reply.tool_calls,
                    )
                )
            if scope.cancelled_caught:
                await self.send(Error(request_id, "cancelled", "request cancelled by the client"))
        finally:
            self.requests.pop(request_id, None)

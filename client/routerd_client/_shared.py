"""What both clients share: building requests, checking the handshake, client-side errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from .errors import BadRequest, ProtocolError, RouterdError, Unavailable, error_from_message
from .protocol import (
    PROTOCOL_VERSION,
    Chat,
    ClientMessage,
    DaemonMessage,
    Error,
    Welcome,
    encode_frame,
)
from .wire import ClientProtocol

M = TypeVar("M", bound=DaemonMessage)

#: How long the connect and the Hello/Welcome exchange may take when no timeout is given.
HANDSHAKE_TIMEOUT = 10.0


def default_client_name() -> str:
    """The name sent in Hello when none is given: ``argv0:pid``, as routerd status shows it."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{argv0}:{os.getpid()}"


def chat_message(
    rid: int,
    route: str,
    messages: Sequence[Mapping[str, Any]] | None,
    deadline: float | None,
    priority: int,
    params: dict[str, Any],
    stream: bool,
    session: str | None = None,
) -> Chat:
    """Build the Chat message for one request; ``params`` are OpenAI chat parameters."""
    request = params if messages is None else {"messages": messages, **params}
    return Chat(
        id=rid,
        route=route,
        request=request,
        stream=stream,
        deadline=deadline,
        priority=priority,
        session=session,
    )


def encode_request(message: ClientMessage) -> bytes:
    """Frame a request, turning an unencodable parameter into BadRequest for the caller."""
    try:
        return encode_frame(message)
    except (msgspec.EncodeError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"the request cannot be sent to routerd: {exc}") from exc


def check_welcome(message: DaemonMessage | None, path: str) -> Welcome:
    """Accept the daemon's reply to Hello, or raise what it means for the caller."""
    if message is None:
        raise Unavailable(f"routerd at {path} closed the connection during the handshake")
    if isinstance(message, Error):
        raise error_from_message(message)
    if not isinstance(message, Welcome):
        raise ProtocolError(
            f"routerd at {path} answered hello with {type(message).__name__}, not welcome"
        )
    if message.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"routerd at {path} speaks protocol version {message.version}, this client "
            f"speaks {PROTOCOL_VERSION}: upgrade routerd-client or routerd so they match"
        )
    return message


def hello_timeout(path: str, handshake: float) -> Unavailable:
    """The error for a daemon that did not finish the handshake in ``handshake`` seconds."""
    return Unavailable(f"routerd at {path} did not answer hello within {handshake} s")


def cannot_connect(path: str, exc: OSError) -> Unavailable:
    """The error for a socket that is missing, refused or not ours to open."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return Unavailable(
        f"cannot connect to routerd at {path}: {reason}; is the daemon running? "
        "Start it with `routerd serve`, or point ROUTERD_SOCKET at its socket"
    )


def connection_lost(path: str) -> Unavailable:
    """The error every pending request gets when the daemon goes away."""
    return Unavailable(
        f"routerd closed the connection ({path}); requests in flight may or may not have run"
    )


def client_closed() -> Unavailable:
    """The error for requests still pending, or newly made, after close()."""
    return Unavailable("the routerd client was closed")


def fail_pending(
    protocol: ClientProtocol[Any],
    closing: bool,
    path: str,
    failure: Callable[[], RouterdError] | None,
) -> None:
    """Fail every request still waiting once the reader stops: the client closed, or the
    connection was lost (to ``failure``, when the bytes said what broke it)."""
    if closing:
        protocol.fail_all(client_closed)
    else:
        protocol.fail_all(failure or (lambda: connection_lost(path)))


def unexpected(message: DaemonMessage, wanted: str) -> ProtocolError:
    """The error for a well-formed reply of the wrong type for its request."""
    return ProtocolError(f"routerd replied {type(message).__name__} where {wanted} was expected")


def lost_or_closed(closing: bool, path: str) -> Unavailable:
    """The error for a request on a dead connection: closed by the client, or lost."""
    return client_closed() if closing else connection_lost(path)


def expect(message: DaemonMessage, kind: type[M], wanted: str) -> M:
    """``message`` if it is the ``kind`` of reply its request wants, else ProtocolError."""
    if isinstance(message, kind):
        return message
    raise unexpected(message, wanted)

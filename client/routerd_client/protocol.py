"""The routerd wire protocol: length-prefixed msgpack frames and the messages of both directions.

A frame is a 4-byte big-endian length followed by one msgpack message. Every message is a
msgspec Struct in one tagged union per direction; the tag field is ``type``. The daemon
imports this module, so the client and the daemon can never disagree on the shape of a frame.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class Attempt(msgspec.Struct, frozen=True, omit_defaults=True):
    """One upstream attempt, as the client sees it: never a secret, only the credential label."""

    target: str
    credential: str
    outcome: str
    status: int | None = None
    latency_ms: float | None = None
    message: str | None = None


# ---- client -> daemon -------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", tag_field="type", omit_defaults=True):
    """First frame on a connection: the protocol version the client speaks and its name."""

    version: int
    client: str = ""


class Chat(msgspec.Struct, tag="chat", tag_field="type", omit_defaults=True):
    """One chat request on a route; ``request`` is in OpenAI chat-completions shape.

    ``deadline`` is seconds from now; None means the route's ``deadline_s``.
    Higher ``priority`` is served first when requests wait for capacity. ``session`` names
    the conversation: its turns stay on the credential whose prompt cache holds it.
    """

    id: int
    route: str
    request: dict[str, Any]
    stream: bool = False
    deadline: float | None = None
    priority: int = 0
    session: str | None = None


class Cancel(msgspec.Struct, tag="cancel", tag_field="type"):
    """Cancel the request with this id; its upstream call is cancelled too."""

    id: int


class Status(msgspec.Struct, tag="status", tag_field="type"):
    """Ask for a StatusReport."""

    id: int


class Reload(msgspec.Struct, tag="reload", tag_field="type"):
    """Re-read the daemon's config file, as SIGHUP does; answered by Reloaded or an Error.

    Only the daemon's own user and root may ask; a config with errors is refused (an Error
    of kind ``config_error`` listing every problem) and the running config stays.
    """

    id: int


ClientMessage = Hello | Chat | Cancel | Status | Reload


# ---- daemon -> client -------------------------------------------------------------------


class Welcome(msgspec.Struct, tag="welcome", tag_field="type"):
    """Reply to Hello."""

    version: int
    server: str
    max_frame: int


class Chunk(msgspec.Struct, tag="chunk", tag_field="type", omit_defaults=True):
    """One piece of a streamed reply. ``tool_calls`` are OpenAI-style tool-call deltas."""

    id: int
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


class Result(msgspec.Struct, tag="result", tag_field="type", omit_defaults=True):
    """The whole reply (or, after a stream's chunks, its summary: the stream is over)."""

    id: int
    text: str
    model: str
    provider: str
    credential: str
    target: str
    usage: dict[str, int] = msgspec.field(default_factory=dict)
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Error(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    """A request (or, with id None, the connection) failed.

    ``kind`` is one of the failure classes (rate_limited, long_context_limited, quota_exhausted,
    auth_failed, target_down, context_overflow, bad_request) or a protocol/daemon class
    (protocol_error, unknown_route, deadline_exceeded, cancelled, unavailable, forbidden,
    internal).
    On the wire the field is named ``class``.
    """

    id: int | None
    kind: str = msgspec.field(name="class")
    message: str = ""
    retry_after: float | None = None
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    details: dict[str, Any] | None = None


class LaneStatus(msgspec.Struct, omit_defaults=True):
    """One lane (requests, tokens, long-context) of a credential as last reported."""

    name: str
    limit: int | None = None
    remaining: int | None = None
    reset_in: float | None = None
    cooling_for: float | None = None


class CredentialStatus(msgspec.Struct, omit_defaults=True):
    """One credential's health: label and fingerprint only, never the key."""

    provider: str
    label: str
    fingerprint: str
    state: str
    cooldown_left: float | None = None
    reason: str | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    latency_ms: float | None = None
    mailbox: int = 0
    lanes: list[LaneStatus] = msgspec.field(default_factory=list)
    # Conversations whose last turn this credential served (their prompt cache is there).
    sessions: int = 0


class TargetStatus(msgspec.Struct, omit_defaults=True):
    """One provider/model target: its breaker and totals."""

    target: str
    breaker: str
    open_for: float | None = None
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    latency_ms: float | None = None


class RouteStatus(msgspec.Struct, omit_defaults=True):
    """One route: its chain and how many requests wait for capacity on it."""

    name: str
    chain: list[str]
    waiting: int = 0


class SharedStateStatus(msgspec.Struct, omit_defaults=True):
    """The state shared with other hosts: its backend, server and whether it is reached."""

    backend: str
    url: str
    connected: bool
    errors: int = 0
    lag_ms: float | None = None


class AffinityStatus(msgspec.Struct, omit_defaults=True):
    """Conversations kept on their credentials: how many, and where their turns went
    ("sticky", "group", "new", or "moved:<why>", e.g. "moved:cooling")."""

    sessions: int = 0
    turns: dict[str, int] = msgspec.field(default_factory=dict)


class StatusReport(msgspec.Struct, tag="status_report", tag_field="type", omit_defaults=True):
    """The same data as ``routerd status --json``."""

    id: int
    version: str
    uptime_s: float
    connections: int
    in_flight: int
    credentials: list[CredentialStatus]
    targets: list[TargetStatus]
    routes: list[RouteStatus]
    # Absent when the state file alone holds the state ([state] backend = "file").
    shared_state: SharedStateStatus | None = None
    affinity: AffinityStatus = msgspec.field(default_factory=AffinityStatus)


class Reloaded(msgspec.Struct, tag="reloaded", tag_field="type"):
    """The daemon took the new config; ``summary`` says what it kept, started and dropped."""

    id: int
    summary: str


DaemonMessage = Welcome | Chunk | Result | Error | StatusReport | Reloaded


# ---- framing ----------------------------------------------------------------------------


class FrameTooLarge(Exception):
    """A frame header announced more bytes than the receiver accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


_encoder = msgspec.msgpack.Encoder()
client_decoder: msgspec.msgpack.Decoder[ClientMessage] = msgspec.msgpack.Decoder(ClientMessage)
daemon_decoder: msgspec.msgpack.Decoder[DaemonMessage] = msgspec.msgpack.Decoder(DaemonMessage)


def encode_frame(message: ClientMessage | DaemonMessage) -> bytes:
    """Serialize one message with its 4-byte big-endian length prefix."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, limit: int) -> int:
    """Read a frame header; refuse a length above ``limit`` before any body byte is read."""
    (size,) = HEADER.unpack(header)
    if size > limit:
        raise FrameTooLarge(size, limit)
    return int(size)

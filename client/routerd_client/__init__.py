"""routerd-client: the thin client for the routerd LLM routing daemon."""

from __future__ import annotations

from .aio import AsyncChatStream, AsyncClient
from .errors import (
    AuthFailed,
    BadRequest,
    Cancelled,
    ConfigRejected,
    ContextOverflow,
    ContextTierDowngrade,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    LongContextLimited,
    ProtocolError,
    QuotaExhausted,
    RateLimited,
    RouterdError,
    TargetDown,
    Unavailable,
    UnknownRoute,
    error_from_message,
)
from .paths import default_socket_path
from .protocol import PROTOCOL_VERSION, Attempt, Chunk, Result, StatusReport
from .sync import ChatStream, Client

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncChatStream",
    "AsyncClient",
    "Attempt",
    "AuthFailed",
    "BadRequest",
    "Cancelled",
    "ChatStream",
    "Chunk",
    "Client",
    "ConfigRejected",
    "ContextOverflow",
    "ContextTierDowngrade",
    "DeadlineExceeded",
    "Forbidden",
    "InternalError",
    "LongContextLimited",
    "ProtocolError",
    "QuotaExhausted",
    "RateLimited",
    "Result",
    "RouterdError",
    "StatusReport",
    "TargetDown",
    "Unavailable",
    "UnknownRoute",
    "default_socket_path",
    "error_from_message",
]

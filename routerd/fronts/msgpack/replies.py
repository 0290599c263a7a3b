"""The dispatcher's answers as msgpack messages: a Reply becomes a Result, a Refused an Error.

The one place where the core's values meet the wire protocol's on the msgpack front.
"""

from __future__ import annotations

from routerd_client.protocol import Attempt, Error, Result

from routerd.core import calls
from routerd.core.errors import Refused


def result_message(request_id: int, reply: calls.Reply) -> Result:
    """The Result that carries ``reply`` to the client that asked with ``request_id``."""
    return Result(
        id=request_id,
        text=reply.text,
        model=reply.model,
        provider=reply.provider,
        credential=reply.credential,
        target=reply.target,
        usage=reply.usage,
        attempts=_attempts(reply.attempts),
        finish_reason=reply.finish_reason,
        tool_calls=reply.tool_calls,
    )


def error_message(request_id: int, refused: Refused) -> Error:
    """The Error that tells the client why its request ``request_id`` was refused."""
    return Error(
        request_id,
        refused.kind,
        refused.message,
        refused.retry_after,
        _attempts(refused.attempts),
        refused.details,
    )


def _attempts(trail: list[calls.Attempt]) -> list[Attempt]:
    return [
        Attempt(a.target, a.credential, a.outcome, a.status, a.latency_ms, a.message) for a in trail
    ]

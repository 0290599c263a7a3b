"""What both API shapes share: JSON encoding, SSE framing, the x-routerd-* account of a reply."""

from __future__ import annotations

import itertools
import secrets
from typing import Any, Literal

import msgspec

from routerd.core.calls import Reply
from routerd.fronts.bounds import MAX_DEPTH, check_request

Api = Literal["openai", "anthropic"]

encode = msgspec.json.Encoder().encode

JSON: tuple[bytes, bytes] = (b"content-type", b"application/json")
SSE: tuple[bytes, bytes] = (b"content-type", b"text/event-stream; charset=utf-8")


class ShapeError(ValueError):
    """The request body does not have the shape of the API it was sent to (a 400)."""


def decode_body(raw: bytes, malformed: str) -> dict[str, Any]:
    """A request body as a JSON object whose values are within bounds (``fronts.bounds``,
    as the msgpack front checks its requests); raises ShapeError, with ``malformed`` as the
    message for a body that is not JSON."""
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec raises the latter for bad UTF-8
        raise ShapeError(malformed) from None
    except RecursionError:  # nested past what the decoder itself can follow
        raise ShapeError(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ShapeError("the request body must be a JSON object")
    problem = check_request(data)
    if problem is not None:
        raise ShapeError(problem)
    return data


# Reply ids: a random prefix per process and a counter, unique without a uuid4 per reply.
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count()


def unique_id() -> str:
    """24 hex digits for a reply's id (chatcmpl-..., msg_..., toolu_...): the process's random
    prefix and a counter, so no two replies of one process, nor likely of two, share one."""
    return f"{_ID_PREFIX}{next(_ids):012x}"


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    return head + b"data: " + encode(data) + b"\n\n"


def served_by(reply: Reply) -> list[tuple[bytes, bytes]]:
    """The x-routerd-* headers: where the reply came from (a credential's label, never a key)."""
    return [
        (b"x-routerd-provider", _header(reply.provider)),
        (b"x-routerd-target", _header(reply.target)),
        (b"x-routerd-credential", _header(reply.credential)),
        (b"x-routerd-attempts", str(len(reply.attempts)).encode()),
    ]


def trailer(reply: Reply) -> bytes:
    """The same account as an SSE comment at the end of a stream.

    A stream's headers leave before the dispatcher knows which target will finish it (a
    fallback happens before the first byte, after the headers were decided), so streams
    carry it here instead; SDKs skip comment lines.
    """
    fields = b" ".join(
        name[len(b"x-routerd-") :] + b"=" + value for name, value in served_by(reply)
    )
    return b": routerd " + fields + b"\n\n"


def _header(value: str) -> bytes:
    # Header values must be visible ASCII; labels and model names are, but never trust it.
    return value.encode("ascii", "replace").replace(b"\r", b"?").replace(b"\n", b"?")

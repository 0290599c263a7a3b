"""OpenAI's chat-completions shape: the request read, the reply and the SSE stream written.

The request body passes to the dispatcher as sent (it already takes OpenAI chat shape),
less what the front itself answers for: ``model`` names the route, ``stream`` and
``stream_options`` shape the response. The upstream adapter sets the model and streaming
options of its own call.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from routerd.core.calls import Delta, Reply
from routerd.fronts.http.errors import HttpError
from routerd.fronts.http.wire import ShapeError, decode_body, encode, trailer, unique_id

# Fields the front consumes; everything else reaches the upstream untouched.
_FRONT_FIELDS = frozenset({"model", "stream", "stream_options"})
# A content chunk around its delta (ChunkEncoder.delta): what follows its model, and its end
# without and with the usage field.
_CHOICE = b',"system_fingerprint":null,"choices":[{"index":0,"delta":'
_END = b',"logprobs":null,"finish_reason":null}]}\n\n'
_END_USAGE = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatHead(msgspec.Struct):
    """The fields the front reads; unknown ones are allowed and passed on."""

    model: str
    messages: list[Any]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None


class ChatRequest(msgspec.Struct, frozen=True):
    """A chat-completions request, split into what routes it and what the upstream gets."""

    route: str
    body: dict[str, Any]
    stream: bool
    include_usage: bool


def json_object(raw: bytes) -> dict[str, Any]:
    """An OpenAI-style request body as a bounded JSON object; raises ShapeError in OpenAI's
    wording."""
    return decode_body(
        raw,
        "We could not parse the JSON body of your request. (HINT: This likely means "
        "you aren't using your HTTP library correctly.)",
    )


def parse_chat(raw: bytes) -> ChatRequest:
    """Read a chat-completions body; raises ShapeError with OpenAI-style wording."""
    data = json_object(raw)
    try:
        head = msgspec.convert(data, _ChatHead)
    except msgspec.ValidationError as exc:
        raise ShapeError(f"Invalid request: {exc}") from None
    if not head.messages:
        raise ShapeError("messages must be a non-empty array")
    if head.n not in (None, 1):
        raise ShapeError("routerd serves one choice per request: n must be 1")
    body = {name: value for name, value in data.items() if name not in _FRONT_FIELDS}
    options = head.stream_options
    return ChatRequest(
        route=head.model,
        body=body,
        stream=bool(head.stream),
        include_usage=bool(options is not None and options.include_usage),
    )


def _usage(usage: dict[str, int]) -> dict[str, Any] | None:
    if not usage:
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    counts: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens", prompt + completion),
    }
    if "cached_tokens" in usage:
        counts["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    return counts


def completion(reply: Reply) -> bytes:
    """The ``chat.completion`` object for a finished reply."""
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI sends null content beside tool calls; an empty string would read as text.
        "content": reply.text if reply.text or not reply.tool_calls else None,
        "refusal": None,
    }
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return encode(
        {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reply.finish_reason or "stop",
                }
            ],
            "usage": _usage(reply.usage),
            "system_fingerprint": None,
        }
    )


class ChunkEncoder:
    """Writes one reply as OpenAI's stream: ``chat.completion.chunk`` events, then [DONE].

    The opening chunk carries the role; each Delta becomes one chunk; the closing chunks
    carry the finish reason and, when the client asked with ``stream_options.include_usage``,
    a usage chunk with no choices, exactly where OpenAI puts them. A content chunk, the one
    written per token, is joined from bytes fixed for the stream around its encoded delta:
    the same bytes as ``_chunk`` writes, a quarter of the work.
    """

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = _completion_id()
        self.created = int(time.time())
        # The model a content chunk last named, and the chunk's bytes before its delta: made
        # at the first one (a reply that does not stream makes none).
        self._prefix: tuple[str | None, bytes] = (None, b"")

    def _chunk(
        self,
        delta: dict[str, Any] | None,
        finish_reason: str | None = None,
        *,
        model: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model or self.model,
            "system_fingerprint": None,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + encode(chunk) + b"\n\n"

    def opening(self) -> bytes:
        """The first chunk: the assistant's role and empty content."""
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def delta(self, delta: Delta) -> bytes:
        """One upstream Delta as a chunk; nothing for a delta that carries only a finish."""
        if delta.model:
            self.model = delta.model
        if not delta.text and not delta.tool_calls:
            return b""
        piece: dict[str, Any] = {}
        if delta.text:
            piece["content"] = delta.text
        if delta.tool_calls:
            piece["tool_calls"] = delta.tool_calls
        model, prefix = self._prefix
        if model != self.model:
            head = b'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s'
            prefix = head % (encode(self.id), self.created, encode(self.model)) + _CHOICE
            self._prefix = (self.model, prefix)
        return b"".join((prefix, encode(piece), _END_USAGE if self.include_usage else _END))

    def closing(self, reply: Reply) -> bytes:
        """The finish chunk, the usage chunk if asked for, routerd's trailer, and [DONE]."""
        out = self._chunk({}, reply.finish_reason or "stop", model=reply.model)
        if self.include_usage:
            out += self._chunk(None, model=reply.model, usage=_usage(reply.usage) or {})
        return out + trailer(reply) + b"data: [DONE]\n\n"

    def error(self, error: HttpError) -> bytes:
        """A failure after the stream began: OpenAI's error chunk; the stream then ends."""
        return b"data: " + encode({"error": error.body["error"]}) + b"\n\n"


def model_list(routes: list[str], targets: list[tuple[str, str]]) -> bytes:
    """GET /v1/models: every route (owned by routerd), then every "provider/model" target."""
    return encode(
        {
            "object": "list",
            "data": [_model(name, "routerd") for name in routes]
            + [_model(name, provider) for name, provider in targets],
        }
    )


def model_card(name: str, owner: str) -> bytes:
    """GET /v1/models/{name}."""
    return encode(_model(name, owner))


def _model(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def _completion_id() -> str:
    return f"chatcmpl-{unique_id()}"

"""The OpenAI dialect: /v1/chat/completions and /v1/models, answered the way OpenAI does.

Status codes, error bodies, rate-limit headers and the SSE stream follow
/work/shared/PROVIDERS.md; the faults of the spec and of prompt directives are played here.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
import msgspec

from routerd.mock import openai_errors as errors
from routerd.mock import openai_wire as wire
from routerd.mock.asgi import Headers, Request, Responder
from routerd.mock.directives import DirectiveError, Directives, parse_directives, strip_directives
from routerd.mock.faults import send_body, wait_or_fail
from routerd.mock.limits import WindowState, ceil_ms, format_go_duration
from routerd.mock.spec import ModelSpec
from routerd.mock.state import Admission, MockState

ORGANIZATION = "org-mock"

# The "timeout" fault: far beyond any client's timeout, yet ended by the client leaving.

# Streams pace their chunks so a client sees them arrive one by one, but never slowly.
_MAX_CHUNK_GAP_S = 0.05
_MODELS_CREATED = 1_700_000_000

_JSON: tuple[bytes, bytes] = (b"content-type", b"application/json")
_SSE: tuple[bytes, bytes] = (b"content-type", b"text/event-stream; charset=utf-8")
_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."

_encode = msgspec.json.Encoder().encode


class _Call:
    """One request on its way to an answer: the headers it carries and where it is counted."""

    def __init__(
        self, state: MockState, reply: Responder, label: str, model: str, *, counted: bool
    ) -> None:
        self.state = state
        self.reply = reply
        self.label = label
        self.model = model
        self.counted = counted
        self.limits: Admission | None = None
        self._request_id = f"req_{uuid.uuid4().hex}"

    def record(self, outcome: str) -> None:
        if self.counted:
            self.state.record(self.label, self.model, outcome)

    def headers(self, content_type: tuple[bytes, bytes]) -> Headers:
        headers = [content_type, (b"x-request-id", self._request_id.encode())]
        if self.limits is not None:
            headers += _limit_headers(self.limits)
        return headers

    async def error(
        self, status: int, detail: wire.ErrorDetail, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        self.record(str(status))
        body = _encode(wire.ErrorBody(detail))
        await self.reply.body(status, body, [*self.headers(_JSON), *extra])


@dataclass(frozen=True, slots=True)
class _Reply:
    """What the model says: text, or one tool call."""

    text: str | None
    tool_call: wire.ToolCall | None
    usage: wire.Usage

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_call is not None else "stop"


async def chat_completions(state: MockState, request: Request, reply: Responder) -> None:
    """Answer one chat-completions request the way OpenAI would, faults included."""
    secret = _bearer_token(request)
    key = state.key(secret) if secret is not None else None
    chat = _decode_chat(request.body)
    model_name = chat.model if isinstance(chat, wire.ChatRequest) else "-"
    call = _Call(state, reply, key.label if key else "unknown", model_name, counted=True)

    if secret is None:
        await call.error(401, errors.missing_key())
        return
    if key is None or key.kind == "invalid":
        await call.error(401, errors.invalid_key(secret))
        return
    if key.kind == "no_quota":
        await call.error(429, errors.no_quota())
        return
    call.limits = state.peek(secret, key)
    if isinstance(chat, str):
        await call.error(400, wire.ErrorDetail(chat, "invalid_request_error"))
        return
    model = state.models.get(chat.model)
    if model is None:
        await call.error(404, errors.model_not_found(chat.model))
        return
    user_text = _last_user_text(chat.messages)
    try:
        directives = parse_directives(user_text)
    except DirectiveError as exc:
        await call.error(400, wire.ErrorDetail(str(exc), "invalid_request_error", "messages"))
        return
    prompt_tokens = _estimate_tokens(chat.messages)
    if directives.fail == "context" or prompt_tokens > model.context_window:
        claimed = max(prompt_tokens, model.context_window + 1)
        await call.error(400, errors.context_exceeded(model.context_window, claimed))
        return
    requested = prompt_tokens + (chat.max_completion_tokens or chat.max_tokens or 16)
    call.limits = admission = state.admit(secret, key, requested)
    if admission.rejected is not None:
        await _rate_limited(call, admission, requested)
        return
    said = strip_directives(user_text)[:40]
    answer = _compose(chat, key.label, said, directives, prompt_tokens)
    parts = [(_encode(m), _tokens(sum(len(t) for t in _texts(m)))) for m in chat.messages]
    answer.usage.prompt_tokens_details.cached_tokens = state.cached_tokens(key, parts)
    await _play(call, chat, model, directives, answer)


async def list_models(state: MockState, request: Request, reply: Responder) -> None:
    """GET /v1/models: every model of the spec, for any key that authenticates."""
    secret = _bearer_token(request)
    key = state.key(secret) if secret is not None else None
    call = _Call(state, reply, key.label if key else "unknown", "-", counted=False)
    if secret is None:
        await call.error(401, errors.missing_key())
        return
    if key is None or key.kind == "invalid":
        await call.error(401, errors.invalid_key(secret))
        return
    cards = [wire.ModelCard(name, "model", _MODELS_CREATED, "mock") for name in state.models]
    await reply.body(200, _encode(wire.ModelList("list", cards)), call.headers(_JSON))


async def not_found(reply: Responder, method: str, path: str) -> None:
    """The answer to a route the mock does not serve, in OpenAI's words."""
    detail = wire.ErrorDetail(f"Invalid URL ({method} {path})", "invalid_request_error")
    await reply.body(404, _encode(wire.ErrorBody(detail)), [_JSON])


async def _play(
    call: _Call,
    chat: wire.ChatRequest,
    model: ModelSpec,
    directives: Directives,
    answer: _Reply,
) -> None:
    """Deliver an admitted request's answer, or the fault it asked for."""
    fault = directives.fail or model.fault
    delay = await wait_or_fail(call, fault, directives.sleep_ms, model, errors.SERVER_FAULTS)
    if delay is None:
        return
    if chat.stream:
        await _stream(call, chat, answer, fault, delay)
        return
    if fault == "midstream":
        await call.error(500, errors.SERVER_FAULTS["500"][1])
        return
    message = wire.AssistantMessage(
        role="assistant",
        content=answer.text,
        tool_calls=[answer.tool_call] if answer.tool_call is not None else None,
    )
    completion = wire.ChatCompletion(
        id=_completion_id(),
        object="chat.completion",
        created=int(time.time()),
        model=chat.model,
        choices=[wire.Choice(index=0, message=message, finish_reason=answer.finish_reason)],
        usage=answer.usage,
    )
    call.record("200")
    await send_body(call.reply, _encode(completion), call.headers(_JSON), cut=fault == "cut")


async def _stream(
    call: _Call, chat: wire.ChatRequest, answer: _Reply, fault: str | None, delay: float
) -> None:
    """Send the answer as OpenAI's SSE stream; "midstream" and "cut" break it after 2 deltas."""
    chunk_id = _completion_id()
    created = int(time.time())

    def chunk(delta: wire.Delta, finish_reason: str | None = None) -> bytes:
        choice = wire.ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return _encode(wire.Chunk(chunk_id, "chat.completion.chunk", created, chat.model, [choice]))

    deltas = _deltas(answer)
    gap = min(delay / len(deltas), _MAX_CHUNK_GAP_S)
    if fault in ("midstream", "cut"):
        deltas = deltas[:2]
    call.record("200")
    await call.reply.start(200, [*call.headers(_SSE), (b"cache-control", b"no-cache")])
    await call.reply.event(chunk(wire.Delta(role="assistant", content="")))
    for delta in deltas:
        await anyio.sleep(gap)
        await call.reply.event(chunk(delta))
    if fault == "midstream":
        detail = wire.StreamErrorDetail(
            "The server had an error while processing your request.", "server_error"
        )
        await call.reply.event(_encode(wire.StreamError(detail)))
        await call.reply.write(b"", last=True)
        return
    if fault == "cut":
        await call.reply.hang_up(reset=False)
        return
    await call.reply.event(chunk(wire.Delta(), answer.finish_reason))
    if chat.stream_options is not None and chat.stream_options.include_usage:
        usage_chunk = wire.Chunk(
            chunk_id, "chat.completion.chunk", created, chat.model, [], usage=answer.usage
        )
        await call.reply.event(_encode(usage_chunk))
    await call.reply.write(b"data: [DONE]\n\n", last=True)


def _compose(
    chat: wire.ChatRequest, label: str, said: str, directives: Directives, prompt_tokens: int
) -> _Reply:
    """The deterministic answer: a tool call when asked for and offered, else an echo."""
    if directives.tool is not None and chat.tools:
        arguments = _encode({"q": said}).decode()
        function = wire.FunctionCall(name=directives.tool, arguments=arguments)
        tool_call = wire.ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}", type="function", function=function
        )
        completion_tokens = _tokens(len(directives.tool) + len(arguments))
        return _Reply(None, tool_call, _usage(prompt_tokens, completion_tokens))
    text = f"mock reply from {chat.model} via {label}: {said}"
    return _Reply(text, None, _usage(prompt_tokens, _tokens(len(text))))


def _deltas(answer: _Reply) -> list[wire.Delta]:
    """The stream's deltas after the opening role chunk, in OpenAI's shapes."""
    if answer.tool_call is None:
        return [wire.Delta(content=piece) for piece in _split(answer.text or "", 4)]
    tool = answer.tool_call
    opening = wire.ToolCallDelta(
        index=0,
        id=tool.id,
        type="function",
        function=wire.FunctionDelta(name=tool.function.name, arguments=""),
    )
    pieces = [
        wire.ToolCallDelta(index=0, function=wire.FunctionDelta(arguments=piece))
        for piece in _split(tool.function.arguments, 3)
    ]
    return [wire.Delta(tool_calls=[delta]) for delta in [opening, *pieces]]


async def _rate_limited(call: _Call, admission: Admission, requested: int) -> None:
    """The 429 for a full window, with OpenAI's message and retry hints."""
    if admission.rejected == "too_large":
        limit = admission.tokens.limit if admission.tokens else 0
        message = (
            f"Request too large for {call.model} in organization {ORGANIZATION} on tokens per "
            f"min (TPM): Limit {limit}, Requested {requested}. The input or output tokens must "
            f"be reduced in order to run successfully. {_DOCS}"
        )
        # No retry-after: waiting does not make this request fit on this key.
        await call.error(429, wire.ErrorDetail(message, "tokens", None, "rate_limit_exceeded"))
        return
    window: WindowState | None
    if admission.rejected == "requests":
        kind, unit, amount, window = "requests", "requests per min (RPM)", 1, admission.requests
    else:
        kind, unit, amount, window = "tokens", "tokens per min (TPM)", requested, admission.tokens
    wait_ms = ceil_ms(admission.retry_after_s)
    message = (
        f"Rate limit reached for {call.model} in organization {ORGANIZATION} on {unit}: "
        f"Limit {window.limit if window else 0}, Used {admission.used}, Requested {amount}. "
        f"Please try again in {format_go_duration(wait_ms / 1000)}. {_DOCS}"
    )
    retry = [
        (b"retry-after", str(max(1, math.ceil(wait_ms / 1000))).encode()),
        (b"retry-after-ms", f"{float(wait_ms)}".encode()),
    ]
    await call.error(429, wire.ErrorDetail(message, kind, None, "rate_limit_exceeded"), retry)


def _limit_headers(admission: Admission) -> Headers:
    headers: Headers = []
    for name, window in (("requests", admission.requests), ("tokens", admission.tokens)):
        if window is None:
            continue
        headers += [
            (f"x-ratelimit-limit-{name}".encode(), str(window.limit).encode()),
            (f"x-ratelimit-remaining-{name}".encode(), str(window.remaining).encode()),
            (f"x-ratelimit-reset-{name}".encode(), format_go_duration(window.reset_s).encode()),
        ]
    return headers


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _decode_chat(body: bytes) -> wire.ChatRequest | str:
    """The request, or the message of the 400 it earns."""
    try:
        return msgspec.json.decode(body, type=wire.ChatRequest)
    except msgspec.ValidationError as exc:
        return f"Invalid request: {exc}"
    except msgspec.DecodeError:
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)"
        )


def _texts(message: wire.ChatMessage) -> list[str]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content if part.text is not None]


def _last_user_text(messages: list[wire.ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return "\n".join(_texts(message))
    return ""


def _estimate_tokens(messages: list[wire.ChatMessage]) -> int:
    return _tokens(sum(len(text) for message in messages for text in _texts(message)))


def _tokens(chars: int) -> int:
    # The usual rule of thumb, four characters a token; close enough to drive limits.
    return math.ceil(chars / 4)


def _usage(prompt_tokens: int, completion_tokens: int) -> wire.Usage:
    return wire.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def _split(text: str, parts: int) -> list[str]:
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"

"""The Anthropic dialect: POST /v1/messages, answered the way Anthropic does.

Status codes, error bodies, rate-limit headers and the SSE stream follow
/work/shared/PROVIDERS.md; the faults of the spec and of prompt directives play as in the
OpenAI dialect, in Anthropic's shapes. A request over the model's context window but within
its ``long_context_window`` is a long-context request: it needs the context-1m beta, and
each key has a separate lane (``long_context``, ``long_context_rpm``) for such requests.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec

from routerd.mock import anthropic_errors as errors
from routerd.mock import anthropic_wire as wire
from routerd.mock.anthropic_headers import ceil_s, limit_headers, window_of
from routerd.mock.asgi import Headers, Request, Responder
from routerd.mock.cache import read_parts
from routerd.mock.directives import DirectiveError, Directives, parse_directives, strip_directives
from routerd.mock.faults import send_body, wait_or_fail
from routerd.mock.spec import KeySpec, ModelSpec
from routerd.mock.state import Admission, MockState, WindowName

# The anthropic-beta value that unlocks a model's long context window (its prefix: the
# real one carries a date, e.g. context-1m-2025-08-07).
LONG_CONTEXT_BETA = "context-1m"

# Streams pace their events so a client sees them arrive one by one, but never slowly.
_MAX_EVENT_GAP_S = 0.05

# What one image counts for, whatever its size: Anthropic charges width*height/750 tokens,
# about this much for the ~1.15-megapixel images it recommends. Images are never decoded.
_IMAGE_TOKENS = 1600

_JSON: tuple[bytes, bytes] = (b"content-type", b"application/json")
_SSE: tuple[bytes, bytes] = (b"content-type", b"text/event-stream; charset=utf-8")

_encode = msgspec.json.Encoder().encode


class _Call:
    """One request on its way to an answer: the headers it carries and where it is counted."""

    def __init__(self, state: MockState, reply: Responder, label: str, model: str) -> None:
        self.state = state
        self.reply = reply
        self.label = label
        self.model = model
        self.limits: Admission | None = None
        self.request_id = f"req_{uuid.uuid4().hex}"

    def record(self, outcome: str) -> None:
        self.state.record(self.label, self.model, outcome)

    def headers(self, content_type: tuple[bytes, bytes]) -> Headers:
        headers = [content_type, (b"request-id", self.request_id.encode())]
        if self.limits is not None:
            headers += limit_headers(self.limits, time.time())
        return headers

    async def error(
        self, status: int, detail: wire.ErrorDetail, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        self.record(str(status))
        body = _encode(wire.ErrorBody(detail, request_id=self.request_id))
        await self.reply.body(status, body, [*self.headers(_JSON), *extra])


@dataclass(frozen=True, slots=True)
class _Reply:
    """What the model says: text, then possibly one tool call, and why it stopped."""

    text: str
    tool_use: wire.ToolUseBlock | None
    stop_reason: str
    stop_sequence: str | None
    usage: wire.Usage


async def messages(state: MockState, request: Request, reply: Responder) -> None:
    """Answer one Messages request the way Anthropic would, faults included."""
    secret = _api_key(request)
    key = state.key(secret) if secret is not None else None
    body = _decode(request.body)
    model_name = body.model if isinstance(body, wire.MessagesRequest) else "-"
    model = state.models.get(model_name)
    prompt_tokens = _estimate_tokens(body) if isinstance(body, wire.MessagesRequest) else 0
    # Counted apart from short calls whatever their outcome, so tests can tell them apart.
    is_long = model is not None and _in_long_range(prompt_tokens, model)
    counted_as = f"{model_name}#long" if is_long else model_name
    call = _Call(state, reply, key.label if key else "unknown", counted_as)

    if secret is None:
        await call.error(401, errors.missing_key())
        return
    if key is None or key.kind == "invalid":
        await call.error(401, errors.invalid_key())
        return
    if not request.headers.get("anthropic-version", "").strip():
        await call.error(400, errors.missing_version())
        return
    if key.kind == "no_quota":
        await call.error(400, errors.no_credit())
        return
    if key.kind == "spend_limit":
        await call.error(429, errors.spend_limit(datetime.now(UTC)))
        return
    call.limits = state.peek(secret, key)
    if isinstance(body, str):
        await call.error(400, errors.invalid_request(body))
        return
    if body.max_tokens is None:
        await call.error(400, errors.invalid_request("max_tokens: Field required"))
        return
    if model is None:
        await call.error(404, errors.model_not_found(body.model))
        return
    user_text = _last_user_text(body.messages)
    try:
        directives = parse_directives(user_text)
    except DirectiveError as exc:
        await call.error(400, errors.invalid_request(str(exc)))
        return
    maximum = _maximum(model, request)
    if directives.fail == "context" or prompt_tokens > maximum:
        claimed = max(prompt_tokens, maximum + 1)
        await call.error(400, errors.prompt_too_long(claimed, maximum))
        return
    if is_long and not key.long_context:
        # No retry-after: this key never serves long requests, so waiting will not help.
        await call.error(429, errors.long_context_not_allowed())
        return
    if not await _admit(call, secret, key, body.model, prompt_tokens, body.max_tokens, is_long):
        return
    cached = state.cached_tokens(key, read_parts(body.messages, prompt_tokens))
    said = strip_directives(user_text)[:40]
    answer = _compose(body, key.label, said, directives, prompt_tokens, cached)
    await _play(call, body, model, directives, answer)


async def _play(
    call: _Call,
    body: wire.MessagesRequest,
    model: ModelSpec,
    directives: Directives,
    answer: _Reply,
) -> None:
    """Deliver an admitted request's answer, or the fault it asked for."""
    fault = directives.fail or model.fault
    delay = await wait_or_fail(call, fault, directives.sleep_ms, model, errors.SERVER_FAULTS)
    if delay is None:
        return
    if body.stream:
        await _stream(call, body.model, answer, fault, delay, directives.unknown_event)
        return
    if fault == "midstream":
        # A whole-body request has no stream to break: it gets the overload up front.
        await call.error(529, errors.OVERLOADED)
        return
    content: list[wire.TextBlock | wire.ToolUseBlock] = [wire.TextBlock(answer.text)]
    if answer.tool_use is not None:
        content.append(answer.tool_use)
    message = wire.Message(
        id=_message_id(),
        type="message",
        role="assistant",
        model=body.model,
        content=content,
        stop_reason=answer.stop_reason,
        stop_sequence=answer.stop_sequence,
        usage=answer.usage,
    )
    call.record("200")
    await send_body(call.reply, _encode(message), call.headers(_JSON), cut=fault == "cut")


async def _stream(
    call: _Call, model: str, answer: _Reply, fault: str | None, delay: float, unknown: bool
) -> None:
    """Send the answer as Anthropic's event stream; "midstream" and "cut" break it early."""
    reply = call.reply
    envelope = wire.Message(
        id=_message_id(),
        type="message",
        role="assistant",
        model=model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        # Anthropic's message_start already counts the first output token.
        usage=wire.Usage(answer.usage.input_tokens, 1),
    )
    pieces = _split(answer.text, 4)
    gap = min(delay / len(pieces), _MAX_EVENT_GAP_S)
    if fault in ("midstream", "cut"):
        pieces = pieces[:2]
    call.record("200")
    await reply.start(200, [*call.headers(_SSE), (b"cache-control", b"no-cache")])
    await _send(reply, wire.MessageStart(envelope))
    await _send(reply, wire.ContentBlockStart(0, wire.TextBlock("")))
    await _send(reply, wire.Ping())
    if unknown:
        await _send(reply, wire.FutureEvent("clients must ignore event types they do not know"))
    for piece in pieces:
        await anyio.sleep(gap)
        await _send(reply, wire.ContentBlockDelta(0, wire.TextDelta(piece)))
    if fault == "midstream":
        await _send(reply, wire.ErrorBody(errors.OVERLOADED), last=True)
        return
    if fault == "cut":
        await reply.hang_up(reset=False)
        return
    await _send(reply, wire.ContentBlockStop(0))
    tool = answer.tool_use
    if tool is not None:
        opening = wire.ToolUseBlock(id=tool.id, name=tool.name, input={})
        await _send(reply, wire.ContentBlockStart(1, opening))
        for piece in _split(_encode(tool.input).decode(), 3):
            await anyio.sleep(gap)
            await _send(reply, wire.ContentBlockDelta(1, wire.InputJsonDelta(piece)))
        await _send(reply, wire.ContentBlockStop(1))
    stop = wire.StopDelta(answer.stop_reason, answer.stop_sequence)
    await _send(reply, wire.MessageDelta(stop, wire.OutputUsage(answer.usage.output_tokens)))
    await _send(reply, wire.MessageStop(), last=True)


async def _send(reply: Responder, event: wire.StreamEvent, *, last: bool = False) -> None:
    """One server-sent event named, as Anthropic names them, after its payload's type."""
    name = type(event).__struct_config__.tag
    assert isinstance(name, str)
    frame = b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"
    await reply.write(frame, last=last)


def _compose(
    body: wire.MessagesRequest,
    label: str,
    said: str,
    directives: Directives,
    prompt_tokens: int,
    cached: int = 0,
) -> _Reply:
    """The deterministic answer: text (an echo), then a tool call when asked for and offered.

    A stop sequence in the text, or running out of ``max_tokens``, ends the reply there,
    before any tool call, as generation would.
    """
    tool = directives.tool if directives.tool is not None and body.tools else None
    if tool is not None:
        text = f"mock tool call from {body.model} via {label}: {tool}"
    else:
        text = f"mock reply from {body.model} via {label}: {said}"
    stop_reason, stop_sequence = ("tool_use" if tool is not None else "end_turn"), None
    cuts: list[tuple[int, str, str | None]] = [
        (text.find(seq), "stop_sequence", seq) for seq in body.stop_sequences or () if seq
    ]
    cuts = [cut for cut in cuts if cut[0] >= 0]
    max_chars = (body.max_tokens or 0) * 4
    if len(text) > max_chars:
        cuts.append((max_chars, "max_tokens", None))
    if cuts:
        at, stop_reason, stop_sequence = min(cuts, key=lambda cut: cut[0])
        text, tool = text[:at], None
    output_tokens = _tokens(len(text))
    tool_use = None
    if tool is not None:
        tool_input = {"q": said}
        tool_use = wire.ToolUseBlock(
            id=f"toolu_{uuid.uuid4().hex[:24]}", name=tool, input=tool_input
        )
        output_tokens += _tokens(len(tool) + len(_encode(tool_input)))
    # The prompt's cached prefix is not in input_tokens, as Anthropic counts it.
    usage = wire.Usage(max(0, prompt_tokens - cached), output_tokens, cached)
    return _Reply(text, tool_use, stop_reason, stop_sequence, usage)


async def _admit(
    call: _Call, secret: str, key: KeySpec, model: str, prompt: int, max_tokens: int, long: bool
) -> bool:
    """Take the request's share of its key's windows, or send the 429 for a full one."""
    amounts: dict[WindowName, int] = {
        "requests": 1,
        # Like Anthropic, output is reserved at max_tokens before anything is generated.
        "tokens": prompt + max_tokens,
        "input_tokens": prompt,
        "output_tokens": max_tokens,
    }
    if long:
        # Checked after the key's own windows: a long-context 429 then means that only the
        # long lane is full, and short requests on this key would still go through.
        amounts["long_requests"] = 1
    call.limits = admission = call.state.admit_amounts(secret, key, amounts)
    if admission.rejected is None:
        return True
    name = admission.refused_by
    assert name is not None
    window = window_of(admission, name)
    detail = errors.rate_limited(name, window.limit if window else 0, model)
    if admission.rejected == "too_large":
        # No retry-after: waiting does not make this request fit on this key.
        await call.error(429, detail)
        return False
    retry = [(b"retry-after", str(max(1, ceil_s(admission.retry_after_s))).encode())]
    await call.error(429, detail, retry)
    return False


def _api_key(request: Request) -> str | None:
    """The key from x-api-key, else from a bearer token (what recent SDKs send)."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _has_long_context_beta(request: Request) -> bool:
    betas = request.headers.get("anthropic-beta", "").split(",")
    return any(beta.strip().startswith(LONG_CONTEXT_BETA) for beta in betas)


def _maximum(model: ModelSpec, request: Request) -> int:
    """The largest prompt this request may send: the long window with the beta header."""
    if model.long_context_window is not None and _has_long_context_beta(request):
        return model.long_context_window
    return model.context_window


def _in_long_range(tokens: int, model: ModelSpec) -> bool:
    window = model.long_context_window
    return window is not None and model.context_window < tokens <= window


def _decode(body: bytes) -> wire.MessagesRequest | str:
    """The request, or the message of the 400 it earns."""
    try:
        return msgspec.json.decode(body, type=wire.MessagesRequest)
    except msgspec.ValidationError as exc:
        return f"Invalid request: {exc}"
    except msgspec.DecodeError:
        return "The request body is not valid JSON."


def _block_chars(block: wire.ContentBlock) -> tuple[int, int]:
    """(characters, images) of one content block, tool results included."""
    if isinstance(block, wire.TextBlock):
        return len(block.text), 0
    if isinstance(block, wire.ImageBlock):
        return 0, 1
    if isinstance(block, wire.ToolUseBlock):
        return len(block.name) + len(_encode(block.input)), 0
    if isinstance(block.content, str):
        return len(block.content), 0
    chars = images = 0
    for inner in block.content or ():
        more_chars, more_images = _block_chars(inner)
        chars, images = chars + more_chars, images + more_images
    return chars, images


def _estimate_tokens(body: wire.MessagesRequest) -> int:
    """The prompt's size: system and messages at four characters a token, plus images.

    Tool definitions are not counted, as in the OpenAI dialect.
    """
    chars = images = 0
    blocks: list[wire.ContentBlock] = []
    if isinstance(body.system, str):
        chars += len(body.system)
    elif body.system is not None:
        blocks += body.system
    for message in body.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        else:
            blocks += message.content
    for block in blocks:
        more_chars, more_images = _block_chars(block)
        chars, images = chars + more_chars, images + more_images
    return _tokens(chars) + images * _IMAGE_TOKENS


def _last_user_text(messages: list[wire.InputMessage]) -> str:
    """The text the user wrote last, where directives are looked for."""
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        return "\n".join(b.text for b in message.content if isinstance(b, wire.TextBlock))
    return ""


def _tokens(chars: int) -> int:
    # The usual rule of thumb, four characters a token, the same as the OpenAI dialect's.
    return math.ceil(chars / 4)


def _split(text: str, parts: int) -> list[str]:
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"

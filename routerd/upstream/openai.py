"""The chat-completions adapter for OpenAI and every OpenAI-compatible API.

One instance serves all ``openai`` and ``openai-compatible`` targets (OpenAI, Groq,
OpenRouter, DeepSeek, vLLM, Ollama, ...) over the daemon's one upstream session. Transport
errors are translated in ``routerd.upstream.common``; callers only ever see UpstreamFailure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from routerd.core.calls import Call, Completion, Delta
from routerd.core.classify import classify, transport_failure
from routerd.core.limits import openai_limits
from routerd.core.outcome import Failure, RateLimitReport, UpstreamFailure
from routerd.upstream.base import LimitsOnAsking
from routerd.upstream.common import Answer, Streamed, endpoint, open_stream, post, sse_events
from routerd.upstream.session import UpstreamSession
from routerd.upstream.wire import Endpoint

__all__ = ["OpenAIAdapter", "OpenAIStream"]


# Typed views of the replies: msgspec decodes straight into these, skipping unknown fields,
# which is faster than building dicts and validates the shape in the same pass.
class _Message(msgspec.Struct):
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: str | None = None


class _Reply(msgspec.Struct):
    choices: list[_Choice] | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


class _ChunkChoice(msgspec.Struct):
    delta: _Message | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_reply = msgspec.json.Decoder(_Reply).decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


def _text(content: str | list[Any] | None) -> str:
    """Message text; some compatible servers send content as a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    # Nested breakdowns are dropped but for the prompt tokens read from the provider's cache
    # (``cached_tokens``); nulls too; bool is not a count.
    if not usage:
        return {}
    counts = {name: value for name, value in usage.items() if type(value) is int}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and type(details.get("cached_tokens")) is int:
        counts["cached_tokens"] = details["cached_tokens"]
    return counts


class OpenAIStream(LimitsOnAsking):
    """An open chat-completions stream. Iterate it once for Deltas.

    ``limits`` is read from the headers when first asked for (by the settle, after the
    stream); ``usage``, ``model`` and ``finish_reason`` are complete once iteration ends.
    Mid-stream errors, cuts and timeouts raise UpstreamFailure.
    """

    __slots__ = (
        "_call",
        "_done",
        "_iterated",
        "_response",
        "finish_reason",
        "model",
        "usage",
    )

    def __init__(
        self, response: Streamed, call: Call, read_limits: Callable[[], RateLimitReport]
    ) -> None:
        super().__init__(read_limits)
        self.usage: dict[str, int] = {}
        self.model = call.model
        self.finish_reason: str | None = None
        self._response = response
        self._call = call
        self._done = False
        self._iterated = False

    def __aiter__(self) -> AsyncIterator[Delta]:
        if self._iterated:
            raise RuntimeError("an upstream stream can be iterated only once")
        self._iterated = True
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        async for event in sse_events(self._response, self._call):
            # After [DONE] the rest is still read, so the connection goes back to the pool.
            if self._done:
                continue
            delta = self._on_event(*event)
            if delta is not None:
                yield delta
        # Some compatible servers end a finished stream without [DONE]; once a finish_reason
        # arrived the client has the whole reply, so only a cut before it is a failure.
        if not self._done and self.finish_reason is None:
            raise UpstreamFailure(
                transport_failure(
                    "stream cut", "connection closed before [DONE]", key=self._call.key
                )
            )

    def _on_event(self, event: str | None, data: str) -> Delta | None:
        if data == "[DONE]":
            self._done = True
            return None
        if event == "error":
            raise UpstreamFailure(classify(None, None, data, key=self._call.key, now=time.time()))
        if data[:1] != "{":
            return None  # keep-alive noise, not a chunk
        try:
            chunk = _decode_chunk(data)
        except msgspec.DecodeError as exc:
            failure = transport_failure("malformed stream chunk", str(exc), key=self._call.key)
        else:
            return self._on_chunk(chunk)
        raise UpstreamFailure(failure)

    def _on_chunk(self, chunk: _Chunk) -> Delta | None:
        if chunk.error is not None:
            # The rate-limit headers belong to the accepted request, not to this error.
            raise UpstreamFailure(
                classify(None, None, {"error": chunk.error}, key=self._call.key, now=time.time())
            )
        if chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self.usage = _usage(chunk.usage)
        if not chunk.choices:
            return None
        choice = chunk.choices[0]  # n > 1 is not routed; the first choice is the reply
        finish = choice.finish_reason
        if finish:
            self.finish_reason = finish
        message = choice.delta
        if message is None:
            return Delta(finish_reason=finish) if finish else None
        text = _text(message.content)
        if text or message.tool_calls or finish:
            return Delta(text=text, tool_calls=message.tool_calls, finish_reason=finish)
        return None


class OpenAIAdapter:
    """POSTs ``{base_url}/chat/completions``; kind "openai", also used for "openai-compatible".

    ``requests_per_day`` marks the request window as daily on every report (Groq's is;
    targets on api.groq.com get it without the flag). ``stream_usage`` asks for the final
    usage chunk; turn it off for a server that rejects ``stream_options``.
    """

    __slots__ = ("_http", "_requests_per_day", "_stream_usage", "kind")

    def __init__(
        self,
        http: UpstreamSession,
        *,
        requests_per_day: bool = False,
        kind: str = "openai",
        stream_usage: bool = True,
    ) -> None:
        self.kind = kind
        self._http = http
        self._requests_per_day = requests_per_day
        self._stream_usage = stream_usage

    def _per_day(self, call: Call) -> bool:
        return self._requests_per_day or "api.groq.com" in call.base_url

    def _prepare(self, call: Call, *, stream: bool) -> tuple[Endpoint | str, bytes, dict[str, str]]:
        # One shallow copy: the caller's body is reused for the next target and must not change.
        body = {**call.body, "model": call.model, "stream": stream}
        if stream:
            if self._stream_usage:
                options = body.get("stream_options")
                body["stream_options"] = (
                    {**options, "include_usage": True}
                    if isinstance(options, dict)
                    else {"include_usage": True}
                )
        else:
            body.pop("stream_options", None)  # OpenAI rejects it on a non-streaming call
        headers = {
            "authorization": f"Bearer {call.key}",
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        if call.headers:
            headers.update(call.headers)
        return endpoint(call.base_url, "chat/completions"), _encode(body), headers

    async def complete(self, call: Call) -> Completion:
        """Send a non-streaming request and return the whole reply."""
        url, content, headers = self._prepare(call, stream=False)
        response = await post(self._http, call, url, content, headers)
        return self._completion(response, call)

    def _completion(self, response: Answer, call: Call) -> Completion:
        per_day = self._per_day(call)
        if not response.is_success:
            raise UpstreamFailure(
                classify(
                    response.status,
                    response.headers,
                    response.body,
                    key=call.key,
                    now=time.time(),
                    requests_per_day=per_day,
                )
            )
        try:
            reply = _decode_reply(response.body)
        except msgspec.DecodeError as exc:
            failure = transport_failure("malformed reply", str(exc), key=call.key)
        else:
            if reply.error is not None:  # OpenRouter can answer 200 with an error body
                failure = classify(
                    response.status,
                    response.headers,
                    {"error": reply.error},
                    key=call.key,
                    now=time.time(),
                    requests_per_day=per_day,
                )
            else:
                return _completion_of(
                    reply, call, openai_limits(response.headers, requests_per_day=per_day)
                )
        raise UpstreamFailure(failure)

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[OpenAIStream]:
        """Open a streaming request; entering raises UpstreamFailure if it fails before any byte."""
        url, content, headers = self._prepare(call, stream=True)
        per_day = self._per_day(call)

        def failed(status: int, headers: dict[str, str], body: bytes | None) -> Failure:
            return classify(
                status,
                headers,
                body,
                key=call.key,
                now=time.time(),
                requests_per_day=per_day,
            )

        async with open_stream(self._http, call, url, content, headers, failed) as response:
            yield OpenAIStream(
                response, call, lambda: openai_limits(response.headers, requests_per_day=per_day)
            )


def _completion_of(reply: _Reply, call: Call, limits: RateLimitReport) -> Completion:
    choice = reply.choices[0] if reply.choices else None
    message = choice.message if choice is not None else None
    return Completion(
        text=_text(message.content) if message is not None else "",
        model=reply.model or call.model,
        finish_reason=choice.finish_reason if choice is not None else None,
        usage=_usage(reply.usage),
        limits=limits,
        tool_calls=message.tool_calls if message is not None else None,
    )

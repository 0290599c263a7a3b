"""The Anthropic Messages adapter: OpenAI-shaped calls in, OpenAI-shaped replies out.

The request is rewritten and the reply, whole or streamed, translated back by
routerd.translate, so an Anthropic target can sit in any chain. Transport errors are
translated by the same one helper the OpenAI adapter uses; callers only see UpstreamFailure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from routerd.core.calls import Call, Completion, Delta
from routerd.core.classify import classify, scrub, transport_failure
from routerd.core.errorbody import MESSAGE_LIMIT
from routerd.core.limits import anthropic_limits
from routerd.core.outcome import Failure, FailureClass, RateLimitReport, UpstreamFailure
from routerd.translate import (
    DEFAULT_MAX_TOKENS,
    AnthropicStreamTranslator,
    TranslationError,
    anthropic_to_completion,
    openai_to_anthropic,
)
from routerd.upstream.base import LimitsOnAsking
from routerd.upstream.common import Answer, Streamed, endpoint, open_stream, post, sse_events
from routerd.upstream.session import UpstreamSession
from routerd.upstream.wire import Endpoint

__all__ = ["ANTHROPIC_VERSION", "AnthropicAdapter", "AnthropicStream"]

ANTHROPIC_VERSION = "2023-06-01"

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


def _messages_url(base_url: str) -> Endpoint | str:
    # The documented base_url is the bare host, but ".../v1" is a common way to write it.
    base = base_url.rstrip("/")
    return endpoint(base, "messages" if base.endswith("/v1") else "v1/messages")


class AnthropicStream(LimitsOnAsking):
    """An open Messages stream. Iterate it once for OpenAI-style Deltas.

    ``limits`` is read from the headers when first asked for (by the settle, after the
    stream); ``usage``, ``model`` and ``finish_reason`` are complete once iteration ends.
    An ``error`` event, a cut before ``message_stop`` and timeouts raise UpstreamFailure.
    """

    __slots__ = (
        "_call",
        "_iterated",
        "_response",
        "_translator",
        "finish_reason",
        "model",
        "usage",
    )

    def __init__(
        self,
        response: Streamed,
        call: Call,
        read_limits: Callable[[], RateLimitReport],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(read_limits)
        self.usage: dict[str, int] = {}
        self.model = call.model
        self.finish_reason: str | None = None
        self._response = response
        self._call = call
        self._translator = AnthropicStreamTranslator(call.model, key=call.key, clock=clock)
        self._iterated = False

    def __aiter__(self) -> AsyncIterator[Delta]:
        if self._iterated:
            raise RuntimeError("an upstream stream can be iterated only once")
        self._iterated = True
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Delta]:
        translator = self._translator
        async for event in sse_events(self._response, self._call):
            # After message_stop the rest is still read, so the connection goes back to the
            # pool.
            if translator.done:
                continue
            delta = self._on_event(*event)
            if delta is not None:
                yield delta
        if not translator.done:
            raise UpstreamFailure(
                transport_failure(
                    "stream cut", "connection closed before message_stop", key=self._call.key
                )
            )

    def _on_event(self, event: str | None, data: str) -> Delta | None:
        try:
            decoded: Any = _decode(data)
        except msgspec.DecodeError as exc:
            failure = transport_failure("malformed stream event", str(exc), key=self._call.key)
        else:
            if isinstance(decoded, dict):
                # The SSE event name and the data's own type agree; either will do alone.
                name = event or decoded.get("type")
                delta = self._translator.feed(name if isinstance(name, str) else "", decoded)
                self._sync()
                return delta
            failure = transport_failure(
                "malformed stream event", "not a JSON object", key=self._call.key
            )
        raise UpstreamFailure(failure)

    def _sync(self) -> None:
        translator = self._translator
        self.model = translator.model
        self.usage = translator.usage
        self.finish_reason = translator.finish_reason


class AnthropicAdapter:
    """POSTs ``{base_url}/v1/messages``; kind "anthropic".

    ``default_max_tokens`` fills Anthropic's required ``max_tokens`` when the client gave
    none. ``clock`` (unix time) turns the RFC 3339 rate-limit resets into seconds.
    """

    __slots__ = ("_clock", "_default_max_tokens", "_http", "kind")

    def __init__(
        self,
        http: UpstreamSession,
        *,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = "anthropic"
        self._http = http
        self._default_max_tokens = default_max_tokens
        self._clock = clock

    def _prepare(self, call: Call, *, stream: bool) -> tuple[Endpoint | str, bytes, dict[str, str]]:
        try:
            body = openai_to_anthropic(
                call.body, call.model, default_max_tokens=self._default_max_tokens
            )
        except TranslationError as exc:
            problem = str(exc)
        else:
            body["stream"] = stream
            return _messages_url(call.base_url), _encode(body), self._headers(call, stream)
        # Anthropic would refuse this request however often it was sent, with any key.
        message = scrub(f"cannot send this request to Anthropic: {problem}", call.key)
        raise UpstreamFailure(
            Failure(
                cls=FailureClass.BAD_REQUEST,
                message=message[:MESSAGE_LIMIT],
                details={"translation": scrub(problem, call.key)[:200]},
            )
        )

    @staticmethod
    def _headers(call: Call, stream: bool) -> dict[str, str]:
        headers = {
            "x-api-key": call.key,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        if call.headers:
            headers.update(call.headers)  # anthropic-beta (1M context, ...) and the like
        return headers

    def _classify(
        self, status: int, headers: dict[str, str], body: bytes | None, call: Call
    ) -> Failure:
        return classify(status, headers, body, key=call.key, now=self._clock())

    async def complete(self, call: Call) -> Completion:
        """Send a non-streaming request and return the whole reply."""
        url, content, headers = self._prepare(call, stream=False)
        response = await post(self._http, call, url, content, headers)
        return self._completion(response, call)

    def _completion(self, response: Answer, call: Call) -> Completion:
        if not response.is_success:
            raise UpstreamFailure(
                self._classify(response.status, response.headers, response.body, call)
            )
        try:
            reply: Any = _decode(response.body)
        except msgspec.DecodeError as exc:
            failure = transport_failure("malformed reply", str(exc), key=call.key)
        else:
            if isinstance(reply, dict) and reply.get("type") == "error":
                failure = self._classify(response.status, response.headers, response.body, call)
            elif isinstance(reply, dict) and isinstance(reply.get("content"), list):
                text, tool_calls, finish, usage, model = anthropic_to_completion(reply)
                return Completion(
                    text=text,
                    model=model or call.model,
                    finish_reason=finish,
                    usage=usage,
                    limits=anthropic_limits(response.headers, self._clock()),
                    tool_calls=tool_calls,
                )
            else:
                failure = transport_failure(
                    "malformed reply", "not an Anthropic message", key=call.key
                )
        raise UpstreamFailure(failure)

    @asynccontextmanager
    async def stream(self, call: Call) -> AsyncIterator[AnthropicStream]:
        """Open a streaming request; entering raises UpstreamFailure if it fails before any byte."""
        url, content, headers = self._prepare(call, stream=True)

        def failed(status: int, headers: dict[str, str], body: bytes | None) -> Failure:
            return self._classify(status, headers, body, call)

        async with open_stream(self._http, call, url, content, headers, failed) as response:
            clock = self._clock
            yield AnthropicStream(
                response, call, lambda: anthropic_limits(response.headers, clock()), clock
            )

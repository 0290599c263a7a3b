"""The HTTP front's ASGI app: a small router over the OpenAI and Anthropic endpoints.

No framework: six endpoints, each a function of a decoded body; what a framework would add
(routing tables, request objects, middleware) costs more code than it saves here.

    POST /v1/chat/completions      OpenAI chat (stream or not)
    POST /v1/messages              Anthropic Messages (stream or not)
    POST /v1/messages/count_tokens routerd's token estimate, in Anthropic's shape
    GET  /v1/models[/{id}]         routes, then targets (Anthropic's list shape when the
                                   request carries anthropic-version)
    GET  /metrics                  Prometheus text
    GET  /healthz                  200 while serving, 503 while draining

A response starts only when the dispatcher has something to say: a stream's headers leave
with its first delta, so every failure before it (fallbacks included) can still be a
proper HTTP error that the SDKs turn into their own exception types.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import msgspec
import structlog

from routerd import __version__
from routerd.core.calls import Delta, Reply
from routerd.core.errors import Refused
from routerd.core.tokens import estimate_prompt
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.budget import BudgetExhausted, BufferBudget
from routerd.fronts.http import anthropic_shape, openai_shape, responses
from routerd.fronts.http.asgi import (
    Headers,
    Receive,
    Scope,
    Send,
    client_of,
    length,
    reply_error,
    reply_json,
    routing_headers,
    start,
)
from routerd.fronts.http.body import BodyTimeout, BodyTooLarge, read_body
from routerd.fronts.http.cancel import hung_up_on, watched
from routerd.fronts.http.connections import BODY_KEY, HANGUP_KEY, Hangup
from routerd.fronts.http.errors import HttpError, front_error, routed_error
from routerd.fronts.http.metrics import CONTENT_TYPE, Metrics
from routerd.fronts.http.responses_store import ResponseStore
from routerd.fronts.http.wire import JSON, SSE, Api, ShapeError, encode, served_by

log = structlog.get_logger("routerd.front")


class StreamEncoder(Protocol):
    """Turns a reply into one API's stream, piece by piece; ``model`` is what it names as
    the model (the serving one, once a delta or the reply tells)."""

    model: str

    def opening(self) -> bytes: ...
    def delta(self, delta: Delta) -> bytes: ...
    def closing(self, reply: Reply) -> bytes: ...
    def error(self, error: HttpError) -> bytes: ...


@dataclass(eq=False)
class FrontState:
    """What every listener's app shares: the dispatcher, metrics, the buffer budget that
    bodies still arriving draw on, and the requests in flight."""

    dispatcher: Dispatcher
    metrics: Metrics
    draining: Callable[[], bool]
    max_body: int
    budget: BufferBudget
    read_timeout_s: float = 30.0
    # The Responses API's answered turns (previous_response_id, GET /v1/responses/{id}).
    responses: ResponseStore = field(default_factory=ResponseStore)
    active: set[anyio.CancelScope] = field(default_factory=set)
    stopping: bool = False

    def cancel_all(self) -> None:
        """Shutting down past the drain: end every request still running (and its upstream call)."""
        self.stopping = True
        for scope in list(self.active):
            scope.cancel()


class _Chat(msgspec.Struct, frozen=True):
    """One chat request in the dispatcher's terms, and how to answer it in its API's shape."""

    api: Api
    route: str
    body: dict[str, Any]
    stream: bool
    encoder: StreamEncoder
    render: Callable[[Reply], bytes]
    # The prompt's estimate when the front needed it already; the dispatcher reuses it.
    prompt_tokens: int | None = None
    # The conversation, when the API's own body carries it past the chat body's fields.
    session: str | None = None


# The paths whose requests reach the dispatcher: a refusal before routing counts there too.
_MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/responses"})


class _Request(msgspec.Struct, frozen=True):
    method: str
    path: str
    headers: Headers
    client: str  # who sent it, the dispatcher's fairness key
    hangup: Hangup | None  # set by routerd's own server (server.HttpConnection)
    whole_body: Callable[[], bytes | None] | None  # likewise (connections.BODY_KEY)


class FrontApp:
    """The ASGI app of one listener; ``token`` is required on TCP, None on the Unix socket."""

    def __init__(self, state: FrontState, *, token: str | None) -> None:
        self.state = state
        self._token = token.encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (lifespan and websocket scopes are not enabled)."""
        if scope["type"] != "http":
            return
        request = _Request(
            method=scope["method"],
            path=scope["path"],
            headers=Headers(scope.get("headers", ())),
            client=client_of(scope),
            hangup=scope.get(HANGUP_KEY),
            whole_body=scope.get(BODY_KEY),
        )
        api: Api = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        # Liveness probes need no secret: /healthz says nothing about keys or traffic.
        public = request.path == "/healthz"
        if self._token is not None and not public and not self._authorized(request.headers):
            self._refused(request, "unauthenticated")
            await reply_error(
                send,
                front_error(
                    api,
                    "unauthenticated",
                    "routerd needs its token: send Authorization: Bearer <token> or "
                    "x-api-key: <token> (the value of the variable server.http_token_env names)",
                ),
            )
            return
        try:
            await self._route(request, api, receive, send)
        except BodyTooLarge:
            self._refused(request, "request_too_large")
            message = f"the request body exceeds server.max_frame ({self.state.max_body} bytes)"
            await reply_error(send, front_error(api, "request_too_large", message), close=True)
        except BodyTimeout:
            self._refused(request, "request_timeout")
            message = (
                f"the request body did not arrive whole within server.read_timeout_s "
                f"({self.state.read_timeout_s:g} s)"
            )
            await reply_error(send, front_error(api, "request_timeout", message), close=True)
        except BudgetExhausted as exc:
            self._refused(request, "unavailable")
            error = front_error(api, "unavailable", str(exc), retry=True)
            await reply_error(send, error, retry_after_s=1, close=True)
        except ShapeError as exc:
            self._refused(request, "bad_request")
            await reply_error(send, front_error(api, "bad_request", str(exc)))

    def _refused(self, request: _Request, kind: str) -> None:
        """Count a model request refused before routing (requests_total, route "")."""
        if request.path in _MODEL_PATHS:
            self.state.dispatcher.refused(kind)

    def _authorized(self, headers: Headers) -> bool:
        assert self._token is not None
        scheme, _, credential = (headers.get("authorization") or "").partition(" ")
        offered = [headers.get("x-api-key") or ""]
        if scheme.lower() == "bearer":
            offered.append(credential.strip())
        # compare_digest on every candidate: the time taken says nothing about the token.
        matches = [hmac.compare_digest(o.encode(), self._token) for o in offered if o]
        return any(matches)

    async def _route(self, request: _Request, api: Api, receive: Receive, send: Send) -> None:
        path, method = request.path, request.method
        handlers: dict[str, Callable[[], Awaitable[None]]] = {}
        if path == "/v1/chat/completions":
            handlers["POST"] = lambda: self._openai_chat(request, receive, send)
        elif path == "/v1/messages":
            handlers["POST"] = lambda: self._anthropic_chat(request, receive, send)
        elif path == "/v1/responses":
            handlers["POST"] = lambda: self._responses(request, receive, send)
        elif path.startswith("/v1/responses/"):
            rid = path.removeprefix("/v1/responses/")
            handlers["GET"] = lambda: self._stored(send, rid, delete=False)
            handlers["DELETE"] = lambda: self._stored(send, rid, delete=True)
        elif path == "/v1/messages/count_tokens":
            handlers["POST"] = lambda: self._count_tokens(request, receive, send)
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            handlers["GET"] = lambda: self._models(request, send)
        elif path == "/metrics":
            handlers["GET"] = lambda: self._metrics(send)
        elif path == "/healthz":
            handlers["GET"] = lambda: self._healthz(send)
        handler = handlers.get(method)
        if handler is not None:
            await handler()
        elif handlers:
            message = f"{method} is not allowed on {path}; use {', '.join(handlers)}"
            await reply_error(send, front_error(api, "method_not_allowed", message))
        else:
            await reply_error(send, front_error(api, "not_found", f"no such path: {path}"))

    # ---- chat -------------------------------------------------------------------------

    async def _openai_chat(self, request: _Request, receive: Receive, send: Send) -> None:
        body = await self._read_body(request, receive)
        if body is None:
            return
        chat = openai_shape.parse_chat(body)
        call = _Chat(
            api="openai",
            route=chat.route,
            body=chat.body,
            stream=chat.stream,
            encoder=openai_shape.ChunkEncoder(chat.route, include_usage=chat.include_usage),
            render=openai_shape.completion,
        )
        await self._chat(call, request, receive, send)

    async def _anthropic_chat(self, request: _Request, receive: Receive, send: Send) -> None:
        body = await self._read_body(request, receive)
        if body is None:
            return
        messages = anthropic_shape.parse_messages(body)
        chat = anthropic_shape.chat_body(messages)
        # message_start reports the prompt's size; the dispatcher plans with the same estimate.
        prompt_tokens = estimate_prompt(chat)
        call = _Chat(
            api="anthropic",
            route=messages.model,
            body=chat,
            stream=bool(messages.stream),
            encoder=anthropic_shape.EventEncoder(messages.model, prompt_tokens),
            render=anthropic_shape.message,
            prompt_tokens=prompt_tokens,
        )
        await self._chat(call, request, receive, send)

    async def _responses(self, request: _Request, receive: Receive, send: Send) -> None:
        body = await self._read_body(request, receive)
        if body is None:
            return
        turn = responses.begin(body, self.state.responses)
        if isinstance(turn, HttpError):
            await reply_error(send, turn)
            return
        call = _Chat(
            "openai",
            turn.route,
            turn.body,
            turn.stream,
            turn.encoder,
            turn.render,
            session=turn.session,
        )
        await self._chat(call, request, receive, send)

    async def _stored(self, send: Send, rid: str, *, delete: bool) -> None:
        status, content = responses.stored(self.state.responses, rid, delete=delete)
        await reply_json(send, status, content)

    async def _chat(self, call: _Chat, request: _Request, receive: Receive, send: Send) -> None:
        """Run one request through the dispatcher and answer it in its API's shape."""
        api, encoder, stream = call.api, call.encoder, call.stream
        if self.state.draining():
            error = front_error(api, "unavailable", "routerd is shutting down", retry=True)
            await reply_error(send, error, retry_after_s=1)
            return
        deadline, priority = routing_headers(request.headers)
        started = False

        async def on_delta(delta: Delta) -> None:
            nonlocal started
            data = encoder.delta(delta)
            if not data:
                return
            if not started:
                started = True
                await start(send, 200, [SSE, (b"cache-control", b"no-cache")])
                data = encoder.opening() + data
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def dispatch() -> Reply:
            return await self.state.dispatcher.chat(
                call.route,
                call.body,
                stream=stream,
                deadline=deadline,
                priority=priority,
                on_delta=on_delta if stream else None,
                client=request.client,
                prompt_tokens=call.prompt_tokens,
                session=request.headers.get("x-routerd-session") or call.session,
            )

        if request.hangup is not None:
            outcome, gone = await hung_up_on(request.hangup, self.state.active, dispatch)
        else:
            outcome, gone = await watched(receive, self.state.active, dispatch)
        if not gone:  # else the client left; its upstream call was cancelled with it
            await self._answer(call, outcome, started, send)

    async def _answer(
        self, call: _Chat, outcome: Reply | Refused | None, started: bool, send: Send
    ) -> None:
        """The reply (or the rest of the stream), or the error, in the call's API's shape."""
        encoder = call.encoder
        if isinstance(outcome, Reply):
            if not call.stream:
                content = call.render(outcome)
                await start(send, 200, [JSON, *served_by(outcome), length(content)])
                await send({"type": "http.response.body", "body": content})
                return
            head = b""
            if not started:
                await start(send, 200, [SSE, (b"cache-control", b"no-cache")])
                encoder.model = outcome.model
                head = encoder.opening()
            await send({"type": "http.response.body", "body": head + encoder.closing(outcome)})
            return
        if outcome is None:
            error = front_error(call.api, "unavailable", "routerd is shutting down", retry=True)
        else:
            error = routed_error(call.api, outcome)
        if started:
            await send({"type": "http.response.body", "body": encoder.error(error)})
        else:
            await reply_error(send, error)

    async def _read_body(self, request: _Request, receive: Receive) -> bytes | None:
        """The whole body within the budget and the read timeout; None if the client left."""
        return await read_body(
            receive,
            request.headers.get("content-length"),
            limit=self.state.max_body,
            budget=self.state.budget,
            timeout_s=self.state.read_timeout_s,
            whole=request.whole_body,
        )

    # ---- the rest ---------------------------------------------------------------------

    async def _count_tokens(self, request: _Request, receive: Receive, send: Send) -> None:
        body = await self._read_body(request, receive)
        if body is None:
            return
        chat = anthropic_shape.chat_body(anthropic_shape.parse_messages(body))
        await reply_json(send, 200, encode({"input_tokens": estimate_prompt(chat)}))

    async def _models(self, request: _Request, send: Send) -> None:
        dispatcher = self.state.dispatcher
        targets = [(name, t.provider) for name, t in dispatcher.targets.items()]
        routes = [name for name in dispatcher.routes if name not in dispatcher.targets]
        wanted = request.path.removeprefix("/v1/models").removeprefix("/")
        if wanted:
            owners = {**dict.fromkeys(routes, "routerd"), **dict(targets)}
            if wanted not in owners:
                message = f"The model '{wanted}' does not exist (not a route or a target)"
                await reply_error(send, front_error("openai", "not_found", message))
                return
            await reply_json(send, 200, openai_shape.model_card(wanted, owners[wanted]))
        elif "anthropic-version" in request.headers:
            await reply_json(send, 200, anthropic_shape.model_list(routes, targets))
        else:
            await reply_json(send, 200, openai_shape.model_list(routes, targets))

    async def _metrics(self, send: Send) -> None:
        content = self.state.metrics.render()
        await start(send, 200, [(b"content-type", CONTENT_TYPE.encode()), length(content)])
        await send({"type": "http.response.body", "body": content})

    async def _healthz(self, send: Send) -> None:
        draining = self.state.draining()
        body = {
            "status": "draining" if draining else "ok",
            "version": __version__,
            "in_flight": self.state.dispatcher.in_flight,
            "buffer_budget": {"used": self.state.budget.used, "limit": self.state.budget.limit},
        }
        await reply_json(send, 503 if draining else 200, encode(body))

"""The mock provider's ASGI app: routes each request to its dialect or to a control endpoint.

A dialect is a module of handlers plus rows in ``_ROUTES``; the control endpoints
(/_mock/...) need no key and are how tests inspect and steer the mock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from routerd.mock import anthropic_api, openai_api
from routerd.mock.asgi import (
    BodyTooLargeError,
    Receive,
    Request,
    Responder,
    Scope,
    Send,
    cancel_on_disconnect,
    read_request,
)
from routerd.mock.spec import ModelSpec
from routerd.mock.state import MockState

Handler = Callable[[MockState, Request, Responder], Awaitable[None]]

_JSON: tuple[bytes, bytes] = (b"content-type", b"application/json")
_MODELS_PREFIX = "/_mock/models/"


async def _stats(state: MockState, request: Request, reply: Responder) -> None:
    await reply.body(200, msgspec.json.encode(state.stats()), [_JSON])


async def _reset(state: MockState, request: Request, reply: Responder) -> None:
    state.reset()
    await reply.body(200, b'{"ok":true}', [_JSON])


async def _set_model(state: MockState, request: Request, reply: Responder) -> None:
    name = request.path.removeprefix(_MODELS_PREFIX)
    try:
        model = msgspec.json.decode(request.body or b"{}", type=ModelSpec)
    except msgspec.DecodeError as exc:
        body = msgspec.json.encode({"error": {"message": str(exc)}})
        await reply.body(400, body, [_JSON])
        return
    state.set_model(name, model)
    await reply.body(200, msgspec.json.encode({"model": name, "spec": model}), [_JSON])


_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/chat/completions"): openai_api.chat_completions,
    ("GET", "/v1/models"): openai_api.list_models,
    ("POST", "/v1/messages"): anthropic_api.messages,
    ("GET", "/_mock/stats"): _stats,
    ("POST", "/_mock/reset"): _reset,
}


class MockApp:
    """A raw ASGI app serving one MockState; serve it with routerd.mock.server."""

    def __init__(self, state: MockState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request; other scope types (lifespan) are not used."""
        if scope["type"] != "http":
            return
        reply = Responder(scope, send)
        try:
            request = await read_request(scope, receive)
        except BodyTooLargeError:
            await reply.body(413, b'{"error":{"message":"Request body too large."}}', [_JSON])
            return
        if request is None:
            return
        handler = self._route(request)

        async def handle() -> None:
            if handler is None:
                await openai_api.not_found(reply, request.method, request.path)
            else:
                await handler(self.state, request, reply)

        await cancel_on_disconnect(receive, handle)

    def _route(self, request: Request) -> Handler | None:
        handler = _ROUTES.get((request.method, request.path.rstrip("/") or "/"))
        if handler is None and request.method == "POST" and request.path.startswith(_MODELS_PREFIX):
            return _set_model
        return handler

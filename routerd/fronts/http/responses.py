"""``/v1/responses``: one Responses API turn through the dispatcher, and the stored ones.

A turn reads its body (``responses_input``), prepends the stored conversation its
``previous_response_id`` names, and answers in the Responses shape (``responses_shape``),
whole or streamed. With ``store`` (the default) the answered turn is kept in the
ResponseStore for ``GET`` / ``DELETE /v1/responses/{id}`` and for the next turn.
"""

from __future__ import annotations

from typing import Any

import structlog

from routerd.core.affinity import session_in
from routerd.core.calls import Reply
from routerd.fronts.http.errors import HttpError, front_error
from routerd.fronts.http.responses_input import ResponsesRequest, parse_responses
from routerd.fronts.http.responses_shape import (
    EventEncoder,
    history,
    output_items,
    response_id,
    response_object,
)
from routerd.fronts.http.responses_store import ResponseStore
from routerd.fronts.http.wire import encode

log = structlog.get_logger("routerd.front")


class Turn:
    """One request's route, chat body and how its reply is written and kept."""

    def __init__(
        self,
        request: ResponsesRequest,
        earlier: list[Any],
        store: ResponseStore,
        root: str | None = None,
    ) -> None:
        self.request = request
        self.id = response_id()
        # The conversation's first response: its turns share one session (prompt cache),
        # unless the body names one itself (prompt_cache_key, user).
        self.root = root or self.id
        self.session = session_in(request.body) or f"response:{self.root}"
        self.route = request.route
        self.stream = request.stream
        self.body = request.chat_body(earlier)
        self.encoder = EventEncoder(self.id, request.route, request.echo, on_final=self.keep)
        self._store = store

    def render(self, reply: Reply) -> bytes:
        """The whole response object of a finished, unstreamed reply (kept if asked)."""
        response = response_object(
            self.id,
            self.encoder.created,
            self.request.echo,
            model=reply.model,
            status="completed",
            output=output_items(reply),
            counts=reply.usage,
            finish_reason=reply.finish_reason,
        )
        self.keep(reply, response)
        return encode(response)

    def keep(self, reply: Reply, response: dict[str, Any]) -> None:
        """Store the answered turn when the request allowed it."""
        if self.request.store:
            turn = history(self.request.messages, reply)
            previous = self.request.previous_response_id
            try:
                self._store.put(self.id, previous, turn, response, root=self.root)
            except Exception:  # the reply was paid for: it goes out, unstored
                log.exception("response_not_stored", id=self.id)


def begin(raw: bytes, store: ResponseStore) -> Turn | HttpError:
    """The turn a body asks for, or the 404 for a previous response no longer kept."""
    request = parse_responses(raw)
    earlier: list[Any] = []
    root: str | None = None
    previous = request.previous_response_id
    if previous is not None:
        root = store.root_of(previous)
        found = store.history(previous)
        if found is None:
            return front_error(
                "openai",
                "not_found",
                f"Previous response with id '{previous}' not found (routerd keeps "
                f"{store.max_entries} responses for {store.ttl_s:g} s, and none with "
                "store: false).",
            )
        earlier = found
    return Turn(request, earlier, store, root)


def stored(store: ResponseStore, rid: str, *, delete: bool) -> tuple[int, bytes]:
    """GET or DELETE /v1/responses/{id}: (status, body)."""
    entry = store.get(rid)
    if entry is None:
        error = front_error("openai", "not_found", f"Response with id '{rid}' not found.")
        return error.status, encode(error.body)
    if delete:
        store.delete(rid)
        return 200, encode({"id": rid, "object": "response", "deleted": True})
    return 200, encode(entry.response)

"""The HTTP front's server against uvicorn's, with the same ASGI app, in one process; then
the front's own app with the dispatcher answering at once.

Both serve a small app that reads the request body and answers a fixed chat completion
with a length and two headers; one client in the same process sends requests one at a
time over loopback TCP on one kept connection. The process's CPU per request is the
client's (the same for both) plus the server's, so the difference between the two is what
the server itself saves; the rounds alternate so both meet the same machine.

The second part calls the front's ASGI app (routerd.fronts.http.app.FrontApp) directly,
its dispatcher replaced by one that replies at once: what the front spends on a chat
request besides the server and the routing, with the body handed over whole (as
routerd's server does) and read through ``receive`` (as under any other ASGI server).

    .venv/bin/python bench/http_server.py --requests 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from routerd.core.calls import Reply
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.budget import BufferBudget
from routerd.fronts.http.app import FrontApp, FrontState
from routerd.fronts.http.asgi import Message, Receive, Scope, Send
from routerd.fronts.http.connections import (
    BODY_KEY,
    HANGUP_KEY,
    Gate,
    Hangup,
    Throttle,
    accept_connections,
)
from routerd.fronts.http.metrics import Metrics
from routerd.fronts.http.server import Site

_BODY = b'{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: routerd\r\ncontent-type: application/json\r\n"
    b"authorization: Bearer token\r\ncontent-length: %d\r\n\r\n%b" % (len(_BODY), _BODY)
)
_REPLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body, answers a fixed completion (what the front's app does, minus routing)."""
    while (await receive()).get("more_body"):
        pass
    headers = [
        (b"content-type", b"application/json"),
        (b"x-routerd-target", b"mock/m1"),
        (b"content-length", str(len(_REPLY)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _REPLY})


async def client(port: int, requests: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(requests):
        writer.write(_REQUEST)
        received = b""
        while not received.endswith(_REPLY):
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            received += chunk
    writer.close()


async def routerd_server() -> tuple[int, Callable[[], Awaitable[None]]]:
    site = Site(app, Gate("tcp", 100), head_timeout_s=30.0, keepalive_s=5.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    accepting = asyncio.ensure_future(accept_connections(listener, site.protocol, Throttle(10)))

    async def stop() -> None:
        accepting.cancel()
        await site.shutdown(1.0)
        listener.close()

    return listener.getsockname()[1], stop


async def uvicorn_server() -> tuple[int, Callable[[], Awaitable[None]]]:
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False)
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: HttpToolsProtocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return server.sockets[0].getsockname()[1], stop


SERVERS = {"routerd": routerd_server, "uvicorn": uvicorn_server}


class _Answering:
    """The dispatcher's place in FrontApp: every chat is answered at once."""

    in_flight = 0

    async def chat(self, route: str, request: dict[str, Any], **_: Any) -> Reply:
        usage = {"prompt_tokens": 5, "completion_tokens": 1}
        return Reply("hi", "m1", "mock", "main", "mock/m1", usage, [], "stop", None)

    def refused(self, kind: str) -> None:
        raise AssertionError(kind)


async def front_app(requests: int, *, whole: bool) -> float:
    """CPU seconds per chat request through FrontApp."""
    budget = BufferBudget(1 << 26)
    dispatcher = cast(Dispatcher, _Answering())
    # /metrics is not asked for: no Metrics is needed.
    state = FrontState(dispatcher, cast(Metrics, None), lambda: False, 1 << 20, budget=budget)
    front = FrontApp(state, token="token")
    headers = [(b"authorization", b"Bearer token"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(_BODY)).encode()))
    sent: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": _BODY, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message.get("status", 0))

    def scope() -> Scope:
        made: Scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        made.update(headers=headers, client=("127.0.0.1", 40000))
        made[HANGUP_KEY] = Hangup()
        if whole:
            made[BODY_KEY] = lambda: _BODY
        return made

    for _ in range(min(2000, requests)):
        await front(scope(), receive, send)
    started = time.process_time()
    for _ in range(requests):
        await front(scope(), receive, send)
    spent = (time.process_time() - started) / requests
    assert set(sent) == {0, 200}, set(sent)
    return spent


async def measure(name: str, requests: int) -> float:
    """CPU seconds per request, client and server together."""
    port, stop = await SERVERS[name]()
    try:
        await client(port, min(2000, requests))  # warm-up
        started = time.process_time()
        await client(port, requests)
        return (time.process_time() - started) / requests
    finally:
        await stop()


async def main(requests: int, rounds: int) -> None:
    samples: dict[str, list[float]] = {name: [] for name in SERVERS}
    for round_ in range(rounds):
        order = list(SERVERS) if round_ % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            samples[name].append(await measure(name, requests))
    mine = statistics.median(samples["routerd"]) * 1e6
    theirs = statistics.median(samples["uvicorn"]) * 1e6
    print(f"HTTP/1.1 server CPU per request, uvloop, {requests} requests x {rounds} rounds,")
    print("client and server in one process (median of the rounds):")
    print(f"  uvicorn {uvicorn.__version__} httptools protocol{theirs:7.1f} us")
    print(f"  routerd fronts/http/server.py   {mine:7.1f} us")
    print(f"  saved per request               {theirs - mine:7.1f} us ({mine / theirs:.2f}x)")
    apps: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for whole in (True, False):
            apps[whole].append(await front_app(requests, whole=whole))
    handed, read = (statistics.median(apps[w]) * 1e6 for w in (True, False))
    print("The front's app per chat request, the dispatcher answering at once:")
    print(f"  body read through receive()     {read:7.1f} us")
    print(f"  body handed over whole          {handed:7.1f} us ({handed / read:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.rounds))

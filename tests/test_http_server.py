"""The HTTP front's own HTTP/1.1 server (routerd.fronts.http.server) with small ASGI apps,
driven by raw sockets and read with h11, on asyncio's loop and on uvloop.

The front's behaviour end to end (SDKs, the token, hostile clients) is tested with the
daemon in test_http_front.py, test_http_sdk.py and test_e2e_http_hostile.py; here each
HTTP rule the server keeps is checked on its own.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import h11
import pytest
from anyio.abc import SocketStream

from routerd.fronts.http.connections import HANGUP_KEY, Gate, Hangup, Throttle, accept_connections
from routerd.fronts.http.server import HIGH_WATER, Site
from tests.loopback import wait_until
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend

App = Callable[[Any, Any, Any], Awaitable[None]]


def loopback_listener() -> socket.socket:
    """A listening, non-blocking TCP socket on a free port of 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    return listener


@asynccontextmanager
async def accepting(site: Site) -> AsyncIterator[int]:
    """``site`` takes connections on a loopback port (yielded) until the block ends; what
    it has open stays open."""
    listener = loopback_listener()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_connections, listener, site.protocol, Throttle(10.0))
            yield listener.getsockname()[1]
            tg.cancel_scope.cancel()
    finally:
        listener.close()


@asynccontextmanager
async def serving(
    app: App, *, keepalive_s: float = 5.0, head_timeout_s: float = 5.0
) -> AsyncIterator[tuple[Site, int]]:
    """``app`` served on a loopback port by a Site; the site shuts down on the way out."""
    site = Site(app, Gate("tcp", 100), head_timeout_s=head_timeout_s, keepalive_s=keepalive_s)
    async with accepting(site) as port:
        yield site, port
    with anyio.fail_after(5):
        await site.shutdown(1.0)


async def reply(status: int, body: bytes, send: Any, *headers: tuple[bytes, bytes]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [length, *headers]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the method, path and body it got."""
    body = await read_body(receive)
    await reply(200, b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body), send)


class Client:
    """Raw requests on one connection; responses read with h11."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.unread = b""

    async def response(self, method: str = "GET") -> tuple[h11.Response, bytes]:
        """The next response, read as the answer to a ``method`` request."""
        parser = h11.Connection(h11.CLIENT)
        # h11 reads a response once its side has sent a request; the bytes went raw.
        parser.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        if self.unread:
            parser.receive_data(self.unread)  # b"" would tell h11 the connection closed
        head: h11.Response | None = None
        body = b""
        with anyio.fail_after(5):
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(await self.received())
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    self.unread = parser.trailing_data[0]
                    return head, body
                elif not isinstance(event, h11.InformationalResponse):
                    raise AssertionError(f"unexpected {event!r}")

    async def received(self) -> bytes:
        try:
            return await self.stream.receive()
        except anyio.EndOfStream:
            return b""

    async def closed(self) -> bool:
        """Whether the server closes the connection within 5 s (reading what is left)."""
        with anyio.fail_after(5):
            while await self.received():
                pass
        return True


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        yield Client(stream)


def request(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: x", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in response.headers if k == name), None)


async def test_a_reply_carries_its_length_and_a_date_and_the_connection_is_kept() -> None:
    async with serving(echo) as (_, port), connect(port) as client:
        for n in range(3):
            await client.stream.send(request("POST", f"/v1/{n}", b"hello"))
            response, body = await client.response()
            assert response.status_code == 200
            assert body == f"POST /v1/{n} hello".encode()
            assert header(response, b"content-length") == str(len(body)).encode()
            assert header(response, b"date") is not None
            assert header(response, b"connection") is None


async def test_pipelined_requests_are_answered_in_the_order_they_came() -> None:
    async def slow_first(scope: Any, receive: Any, send: Any) -> None:
        # The first request takes longest: answered out of turn, it would come last.
        await anyio.sleep({"/1": 0.2, "/2": 0.1}.get(scope["path"], 0))
        await echo(scope, receive, send)

    async with serving(slow_first) as (_, port), connect(port) as client:
        await client.stream.send(b"".join(request("POST", f"/{n}", b"b%d" % n) for n in (1, 2, 3)))
        bodies = [(await client.response())[1] for _ in range(3)]
    assert bodies == [b"POST /1 b1", b"POST /2 b2", b"POST /3 b3"]


async def test_a_response_without_length_is_chunked_and_ends() -> None:
    async def stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async with serving(stream) as (_, port), connect(port) as client:
        for _ in range(2):  # and the connection serves on after it
            await client.stream.send(request("GET", "/s"))
            response, body = await client.response()
            assert header(response, b"transfer-encoding") == b"chunked"
            assert body == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_http_1_0_is_answered_and_closed() -> None:
    async def unsized(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"old client"})

    async with serving(unsized) as (_, port), connect(port) as client:
        await client.stream.send(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        with anyio.fail_after(5):
            while chunk := await client.received():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head and b"chunked" not in head
    assert body == b"old client"


async def test_a_head_request_gets_the_head_only() -> None:
    async def sized(scope: Any, receive: Any, send: Any) -> None:
        await reply(405, b"not here", send)

    async with serving(sized) as (_, port), connect(port) as client:
        await client.stream.send(request("HEAD", "/healthz") + request("GET", "/healthz"))
        response, body = await client.response("HEAD")
        assert response.status_code == 405 and body == b""
        assert header(response, b"content-length") == b"8"
        response, body = await client.response()
        assert body == b"not here"


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n", b"400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), b"400"),
        (b"GET / HTTP/1.1\r\n" + b"x-big: " + b"a" * (64 * 1024) + b"\r\n\r\n", b"431"),
        (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n", b"431"),
    ],
    ids=["malformed-header", "tls-hello", "huge-header", "huge-url"],
)
async def test_a_request_that_cannot_be_served_is_answered_and_closed(
    sent: bytes, status: bytes
) -> None:
    called: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])
        await echo(scope, receive, send)

    async with serving(app) as (_, port):
        async with connect(port) as client:
            await client.stream.send(sent)
            data = b""
            with anyio.fail_after(5):
                while chunk := await client.received():
                    data += chunk
        assert data.startswith(b"HTTP/1.1 " + status), data[:80]
        assert b"connection: close" in data
        assert called == []
        async with connect(port) as client:  # and the server serves the next client
            await client.stream.send(request("GET", "/after"))
            assert (await client.response())[1] == b"GET /after "


async def test_expect_100_continue_is_answered_when_the_app_reads() -> None:
    async with serving(echo) as (_, port), connect(port) as client:
        head = request("POST", "/up", b"", "expect: 100-continue").replace(
            b"content-length: 0", b"content-length: 4"
        )
        await client.stream.send(head)
        with anyio.fail_after(5):
            interim = await client.stream.receive()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.stream.send(b"data")
        assert (await client.response())[1] == b"POST /up data"


async def test_a_large_body_arrives_whole_while_the_server_buffers_little() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    largest: list[int] = []

    async def slow_reader(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(0.3)  # the client has sent all it could by now
        parts = []
        while True:
            message = await receive()
            largest.append(len(message["body"]))
            parts.append(message["body"])
            if not message["more_body"]:
                break
        body = b"".join(parts)
        await reply(200, b"%d %d" % (len(body), body == payload), send)

    async with (
        serving(slow_reader) as (_, port),
        connect(port) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(client.stream.send, request("POST", "/big", payload))
        _, body = await client.response()
    assert body == b"1048576 1"
    # Reading paused past the high-water mark: what waited was a read or so beyond it.
    assert max(largest) <= HIGH_WATER + 256 * 1024


@pytest.mark.parametrize("failure", ["raises", "never-answers", "bad-header"])
async def test_an_app_that_fails_before_answering_gets_a_500(failure: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/ok":
            await echo(scope, receive, send)
        elif failure == "raises":
            raise RuntimeError("boom")
        elif failure == "bad-header":
            await reply(200, b"x", send, (b"x-model", b"m1\r\nset-cookie: injected"))

    async with serving(app) as (_, port):
        async with connect(port) as client:
            await client.stream.send(request("GET", "/fails"))
            response, body = await client.response()
            assert response.status_code == 500 and body == b"Internal Server Error"
            assert header(response, b"set-cookie") is None
            assert await client.closed()
        async with connect(port) as client:
            await client.stream.send(request("GET", "/ok"))
            assert (await client.response())[1] == b"GET /ok "


async def test_an_app_that_stops_mid_response_has_its_connection_closed() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})

    async with serving(app) as (_, port), connect(port) as client:
        await client.stream.send(request("GET", "/"))
        assert await client.closed()


async def test_a_client_that_leaves_cancels_its_request() -> None:
    cancelled = anyio.Event()
    running = anyio.Event()

    async def waits(scope: Any, receive: Any, send: Any) -> None:
        hangup: Hangup = scope[HANGUP_KEY]
        with anyio.CancelScope() as cancel:
            hangup.watch(cancel)
            running.set()
            await anyio.sleep(30)
        if cancel.cancelled_caught:
            cancelled.set()

    async with serving(waits) as (_, port):
        async with connect(port) as client:
            await client.stream.send(request("GET", "/"))
            with anyio.fail_after(5):
                await running.wait()
        with anyio.fail_after(5):
            await cancelled.wait()


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with serving(echo, keepalive_s=0.2) as (_, port), connect(port) as client:
        await client.stream.send(request("GET", "/"))
        await client.response()
        started = anyio.current_time()
        assert await client.closed()
        assert 0.15 < anyio.current_time() - started < 3


async def test_a_half_sent_head_gets_a_408() -> None:
    async with serving(echo, head_timeout_s=0.2) as (_, port), connect(port) as client:
        await client.stream.send(b"GET / HTTP/1.1\r\nhost:")
        data = b""
        with anyio.fail_after(5):
            while chunk := await client.received():
                data += chunk
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_shutdown_closes_idle_connections_and_waits_for_running_requests() -> None:
    release = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        elif scope["path"] == "/forever":
            await anyio.sleep(60)
        await echo(scope, receive, send)

    site = Site(app, Gate("tcp", 100), head_timeout_s=5, keepalive_s=5)
    async with accepting(site) as port:
        idle = Client(await anyio.connect_tcp("127.0.0.1", port))
        slow = Client(await anyio.connect_tcp("127.0.0.1", port))
        stuck = Client(await anyio.connect_tcp("127.0.0.1", port))
        await idle.stream.send(request("GET", "/idle"))
        await idle.response()
        await slow.stream.send(request("GET", "/slow"))
        await stuck.stream.send(request("GET", "/forever"))
        await wait_until(lambda: len(site.tasks) == 2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as stopping:
            stopping.start_soon(site.shutdown, 0.5)
            assert await idle.closed()
            release.set()
            response, body = await slow.response()
            assert body == b"GET /slow " and header(response, b"connection") == b"close"
            assert await slow.closed()
            started = anyio.current_time()
            assert await stuck.closed()  # cancelled once the grace period ran out
            assert anyio.current_time() - started < 3
    for client in (idle, slow, stuck):
        await client.stream.aclose()
    assert not site.tasks and not site.connections


class RecordingTransport:
    """What a connection writes, one entry per write, on no socket at all."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces)


@pytest.mark.parametrize("waits", [True, False], ids=["turn-ends-between", "final-at-once"])
async def test_a_streams_chunks_sent_in_one_loop_turn_leave_in_one_write(waits: bool) -> None:
    """The first bytes go at once; chunks sent back to back are held to the end of the loop
    turn and written together; the last write takes what is still held, in order."""
    release = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"a", b"b", b"c", b"d"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if waits:
            await release.wait()
        await send({"type": "http.response.body", "body": b"e", "more_body": False})

    site = Site(app, Gate("tcp", 100), head_timeout_s=5, keepalive_s=5)
    transport = RecordingTransport()
    connection = site.protocol()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(request("GET", "/"))
    if waits:
        await wait_until(lambda: len(transport.writes) == 2)
        release.set()
    await wait_until(lambda: not site.tasks)
    head, first = transport.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and first == chunked(b"a")
    rest = [chunked(b"b", b"c", b"d"), chunked(b"e") + b"0\r\n\r\n"]
    assert transport.writes[1:] == (rest if waits else [b"".join(rest)])
    connection.close()
    assert transport.closed
    connection.connection_lost(None)


async def test_what_a_connection_holds_is_written_before_it_closes() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        raise RuntimeError("the app fails mid-response")

    site = Site(app, Gate("tcp", 100), head_timeout_s=5, keepalive_s=5)
    transport = RecordingTransport()
    connection = site.protocol()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(request("GET", "/"))
    await wait_until(lambda: transport.closed)
    assert transport.writes[1:] == [chunked(b"b")]
    await wait_until(lambda: not site.tasks)
    connection.connection_lost(None)

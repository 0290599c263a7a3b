"""The upstream HTTP client (routerd.upstream.session) against raw servers on loopback.

Each server answers with bytes written by hand, so a test can send what a well-behaved
server never would (a broken status line, a body cut short, bytes after the reply). Every
test runs on asyncio's own loop and on uvloop, which the daemon may use.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import socket
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from routerd.core.calls import Call
from routerd.core.outcome import UpstreamFailure
from routerd.upstream import common, connection
from routerd.upstream.common import Streamed, sse_events
from routerd.upstream.connection import HIGH_WATER, MAX_HEAD, MAX_INFLATED
from routerd.upstream.session import Response, UpstreamSession
from routerd.upstream.wire import (
    ConnectError,
    InvalidURL,
    NetworkError,
    ProtocolError,
    ReadTimeout,
    RefusedHeader,
    parse_endpoint,
)
from tests.loopback import wait_until
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend
from tests.streamserver import StreamServer


class Request:
    """What the server read: the head's lines and the body (and the connection's reader)."""

    def __init__(self, head: list[bytes], body: bytes, reader: asyncio.StreamReader) -> None:
        self.head = head
        self.body = body
        self.reader = reader


# Writes the reply to one request; returns whether to keep the connection for another.
Respond = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


class Server(StreamServer):
    """A raw HTTP/1.1 server on 127.0.0.1: ``respond`` answers each request on a connection.
    ``peers`` holds the client address of each request; ``closed`` counts connections that
    ended (the client's side closing them included)."""

    def __init__(self, respond: Respond) -> None:
        super().__init__()
        self.respond = respond
        self.peers: list[Any] = []
        self.requests: list[Request] = []
        self.closed = 0

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/v1/chat?x=1"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.peers.append(peer)
                self.requests.append(request)
                try:
                    if not await self.respond(request, writer):
                        return
                except ConnectionError:
                    return  # the client closed it mid-reply
        finally:
            self.closed += 1
            writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> Request:
    head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
    length = next(
        (int(line.split(b":")[1]) for line in head if line.lower().startswith(b"content-length")),
        0,
    )
    return Request(head, await reader.readexactly(length), reader)


def answer(body: bytes = b'{"ok": true}', status: bytes = b"200 OK", extra: bytes = b"") -> Respond:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        length = b"Content-Length: %d\r\n" % len(body)
        writer.write(b"HTTP/1.1 " + status + b"\r\n" + length + extra + b"\r\n" + body)
        return True

    return respond


def raw(data: bytes, *, then_close: bool = True) -> Respond:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return not then_close

    return respond


@pytest.fixture
async def session() -> AsyncIterator[UpstreamSession]:
    async with UpstreamSession(4) as made:
        yield made


async def serving(respond: Respond) -> Server:
    return await Server(respond).start()


async def fetch(session: UpstreamSession, url: str, read_s: float = 5.0) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    response = await session.request(url, b'{"q": 1}', headers, read_s)
    try:
        return response.status, await response.conn.read_all()
    finally:
        response.release()


async def settle() -> None:
    """Let the loop run the callbacks a close schedules."""
    for _ in range(3):
        await asyncio.sleep(0)


# --- keep-alive and the pool ------------------------------------------------------------


async def test_a_connection_is_kept_and_reused(session: UpstreamSession) -> None:
    server = await serving(answer())
    try:
        assert await fetch(session, server.url()) == (200, b'{"ok": true}')
        assert await fetch(session, server.url()) == (200, b'{"ok": true}')
        assert len(server.peers) == 2 and server.peers[0] == server.peers[1]
        pool = session.pool()
        assert (pool.open, len(pool.in_use), pool.idle_count()) == (1, 0, 1)
        request = server.requests[0]
        assert request.head[0] == b"POST /v1/chat?x=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{server.port}".encode() in request.head
        assert b"Content-Length: 8" in request.head and request.body == b'{"q": 1}'
        assert not any(line.lower().startswith(b"accept-encoding") for line in request.head)
    finally:
        await server.stop()


async def test_a_long_prompt_is_sent_whole(session: UpstreamSession) -> None:
    async def length(request: Request, writer: asyncio.StreamWriter) -> bool:
        return await answer(str(len(request.body)).encode())(request, writer)

    server = await serving(length)
    try:
        content = bytes(range(256)) * 8192  # 2 MiB: written apart from its head
        response = await session.request(server.url(), content, {"x-a": "1"}, 5.0)
        try:
            assert await response.conn.read_all() == str(len(content)).encode()
        finally:
            response.release()
        assert server.requests[0].body == content
    finally:
        await server.stop()


async def test_the_cap_makes_the_extra_call_wait_and_nothing_leaks() -> None:
    release = asyncio.Event()

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return await answer()(request, writer)

    server = await serving(held)
    try:
        async with UpstreamSession(2) as session:
            calls = [asyncio.create_task(fetch(session, server.url())) for _ in range(3)]
            await wait_until(lambda: len(server.requests) >= 2)
            await asyncio.sleep(0.05)
            pool = session.pool()
            assert len(server.requests) == 2 and pool.open == 2  # the third one waits
            release.set()
            assert [await call for call in calls] == [(200, b'{"ok": true}')] * 3
            assert len(set(server.peers)) == 2  # the third reused a connection
            assert (pool.open, len(pool.in_use)) == (2, 0)
    finally:
        await server.stop()


async def test_a_cancelled_call_closes_its_connection_and_frees_its_slot() -> None:
    async def hang(request: Request, writer: asyncio.StreamWriter) -> bool:
        await request.reader.read()  # no reply: until the client closes the connection
        return False

    server = await serving(hang)
    try:
        async with UpstreamSession(1) as session:
            first = asyncio.create_task(fetch(session, server.url()))
            second = asyncio.create_task(fetch(session, server.url()))  # waits for the slot
            await wait_until(lambda: bool(server.requests))
            second.cancel()
            first.cancel()
            for task in (first, second):
                with pytest.raises(asyncio.CancelledError):
                    await task
            pool = session.pool()
            assert (pool.open, len(pool.in_use), pool.idle_count()) == (0, 0, 0)
            await wait_until(lambda: server.closed >= 1)  # the server saw the connection end
            server.respond = answer()
            assert await fetch(session, server.url()) == (200, b'{"ok": true}')
            assert pool.open == 1
    finally:
        await server.stop()


async def test_an_idle_connection_is_closed_when_its_keepalive_ends() -> None:
    server = await serving(answer())
    try:
        async with UpstreamSession(4, keepalive_s=0.2) as session:
            await fetch(session, server.url())
            assert session.pool().open == 1
            await asyncio.sleep(0.35)
            assert (session.pool().open, session.pool().idle_count()) == (0, 0)
            await wait_until(lambda: server.closed >= 1)
    finally:
        await server.stop()


async def test_a_connection_the_server_closed_while_idle_leaves_the_pool(
    session: UpstreamSession,
) -> None:
    server = await serving(answer())
    try:
        await fetch(session, server.url())
        await server.stop()  # drops every connection, the idle one too
        await settle()
        assert (session.pool().open, session.pool().idle_count()) == (0, 0)
    finally:
        await server.stop()


async def test_a_full_pool_of_idle_connections_to_other_hosts_makes_room() -> None:
    first, second = await serving(answer(b"a")), await serving(answer(b"b"))
    try:
        async with UpstreamSession(1) as session:
            assert await fetch(session, first.url()) == (200, b"a")
            assert await fetch(session, second.url()) == (200, b"b")
            assert session.pool().open == 1
    finally:
        await first.stop()
        await second.stop()


async def test_aclose_fails_the_calls_in_flight() -> None:
    async def hang(request: Request, writer: asyncio.StreamWriter) -> bool:
        await request.reader.read()  # no reply: until the client closes the connection
        return False

    server = await serving(hang)
    try:
        session = UpstreamSession(4)
        call = asyncio.create_task(fetch(session, server.url()))
        await wait_until(lambda: bool(server.requests))
        pool = session.pool()
        await session.aclose()
        with pytest.raises(NetworkError):
            await call
        assert pool.open == 0
    finally:
        await server.stop()


# --- what comes back --------------------------------------------------------------------


async def test_a_chunked_reply_is_read_whole(session: UpstreamSession) -> None:
    async def chunked(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        return True

    server = await serving(chunked)
    try:
        assert await fetch(session, server.url()) == (200, b"hello world")
        assert session.pool().idle_count() == 1  # chunked framing ends cleanly: kept
    finally:
        await server.stop()


async def test_a_reply_without_a_length_ends_when_the_server_closes(
    session: UpstreamSession,
) -> None:
    server = await serving(raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"))
    try:
        assert await fetch(session, server.url()) == (200, b"until close")
        await settle()
        assert session.pool().open == 0  # never reused
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("encoding", "encode"), [(b"gzip", gzip.compress), (b"deflate", zlib.compress)]
)
async def test_a_compressed_reply_is_decoded(
    session: UpstreamSession, encoding: bytes, encode: Callable[[bytes], bytes]
) -> None:
    text = b"compressed " * 1000
    server = await serving(answer(encode(text), extra=b"Content-Encoding: " + encoding + b"\r\n"))
    try:
        assert await fetch(session, server.url()) == (200, text)
    finally:
        await server.stop()


async def test_headers_are_lower_case_and_a_repeated_one_keeps_its_last_value(
    session: UpstreamSession,
) -> None:
    extra = b"X-Limit: 1\r\nx-limit: 2\r\nRetry-After: 3\r\n"
    server = await serving(answer(b"", status=b"429 Too Many Requests", extra=extra))
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        response.release()
        assert response.status == 429
        assert response.headers["x-limit"] == "2" and response.headers["retry-after"] == "3"
    finally:
        await server.stop()


async def test_an_interim_reply_is_skipped_and_a_redirect_is_not_followed(
    session: UpstreamSession,
) -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    moved = b"HTTP/1.1 307 Moved\r\nLocation: http://elsewhere.invalid/\r\nContent-Length: 0\r\n"
    server = await serving(raw(interim + moved + b"\r\n"))
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        response.release()
        assert response.status == 307 and "link" not in response.headers
        assert len(server.requests) == 1
    finally:
        await server.stop()


async def test_bytes_after_the_reply_keep_the_connection_out_of_the_pool(
    session: UpstreamSession,
) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server = await serving(raw(reply + b"HTTP/1.1 200 OK\r\n", then_close=False))
    try:
        assert await fetch(session, server.url()) == (200, b"ok")
        await settle()
        assert (session.pool().open, session.pool().idle_count()) == (0, 0)
    finally:
        await server.stop()


# --- faults -----------------------------------------------------------------------------


async def test_a_broken_status_line_is_a_protocol_error(session: UpstreamSession) -> None:
    server = await serving(raw(b"HTTX/1.1 200 OK\r\n\r\n"))
    try:
        with pytest.raises(ProtocolError, match="malformed response"):
            await fetch(session, server.url())
        assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_server_closing_within_the_body_is_a_protocol_error(
    session: UpstreamSession,
) -> None:
    server = await serving(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten.."))
    try:
        with pytest.raises(ProtocolError, match="within the reply's body"):
            await fetch(session, server.url())
        assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_server_closing_before_replying_is_a_protocol_error(
    session: UpstreamSession,
) -> None:
    server = await serving(raw(b""))
    try:
        with pytest.raises(ProtocolError, match="before replying"):
            await fetch(session, server.url())
    finally:
        await server.stop()


async def test_an_undecodable_body_is_a_protocol_error(session: UpstreamSession) -> None:
    server = await serving(answer(b"not gzip at all", extra=b"Content-Encoding: gzip\r\n"))
    try:
        with pytest.raises(ProtocolError, match="undecodable body"):
            await fetch(session, server.url())
    finally:
        await server.stop()


def _trickle(pieces: int, every_s: float) -> Respond:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % pieces)
        for _ in range(pieces):
            await asyncio.sleep(every_s)
            writer.write(b"x")
        return True

    return respond


async def test_silence_past_the_read_timeout_fails_the_read(session: UpstreamSession) -> None:
    server = await serving(_trickle(1, every_s=5.0))
    try:
        with pytest.raises(ReadTimeout):
            await fetch(session, server.url(), read_s=0.2)
        assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_slow_but_steady_reply_outlasts_the_read_timeout(session: UpstreamSession) -> None:
    server = await serving(_trickle(8, every_s=0.08))  # 0.64 s in all, never 0.25 s quiet
    try:
        assert await fetch(session, server.url(), read_s=0.25) == (200, b"x" * 8)
    finally:
        await server.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_connection_is_a_connect_error(session: UpstreamSession) -> None:
    with pytest.raises(ConnectError, match="cannot connect"):
        await fetch(session, f"http://127.0.0.1:{_closed_port()}/v1")
    assert session.pool().open == 0


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    session: UpstreamSession,
) -> None:
    server = await serving(answer())
    try:
        with pytest.raises(RefusedHeader) as caught:
            await session.request(server.url(), b"", {"x-api-key": "sk-secret\n"}, 5.0)
        assert "sk-secret" not in str(caught.value)
        assert server.requests == [] and session.pool().open == 0
    finally:
        await server.stop()


def test_urls_that_cannot_be_requested_are_invalid() -> None:
    for url in ("http://[::1", "ftp://host/x", "http:///path", "http://host:99999/"):
        with pytest.raises(InvalidURL):
            parse_endpoint(url)
    endpoint = parse_endpoint("https://api.example.com/v1/chat completions")
    assert endpoint.key == ("https", "api.example.com", 443)
    assert endpoint.head.startswith(b"POST /v1/chat%20completions HTTP/1.1\r\n")


# --- streaming --------------------------------------------------------------------------


FLOOD = 8 * 1024 * 1024


async def flood(request: Request, writer: asyncio.StreamWriter) -> bool:
    """An 8 MiB body, sent as fast as the client takes it."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FLOOD)
    for _ in range(FLOOD // 65536):
        writer.write(b"y" * 65536)
        await writer.drain()
    return True


async def test_a_reader_slower_than_its_server_holds_a_bounded_buffer(
    session: UpstreamSession,
) -> None:
    server = await serving(flood)
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        try:
            received = len(await response.conn.read())
            await asyncio.sleep(0.2)  # the server could send it all by now, were it let
            held = response.conn.buffered
            assert 0 < held < HIGH_WATER + 512 * 1024
            while chunk := await response.conn.read():
                received += len(chunk)
            assert received == FLOOD
        finally:
            response.release()
        assert session.pool().idle_count() == 1
    finally:
        await server.stop()


async def test_a_stream_left_with_unread_bytes_lets_them_go_with_it(
    session: UpstreamSession,
) -> None:
    # Closed, the connection waits for the cycle collector (its parser calls back into
    # it), so what it still buffers must go when the exchange ends, not with the object.
    server = await serving(flood)
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        conn = response.conn
        await wait_until(lambda: conn.buffered >= HIGH_WATER)
        response.release()  # left unread: the connection closes
        assert conn.closed
        assert conn.buffered == 0
    finally:
        await server.stop()


async def test_a_stream_left_before_its_end_closes_its_connection(
    session: UpstreamSession,
) -> None:
    async def endless(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()  # raises once the client has closed the connection
            await asyncio.sleep(0.01)

    server = await serving(endless)
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        assert await response.conn.read() == b"hello"
        response.release()
        assert session.pool().open == 0
        await wait_until(lambda: server.closed >= 1)
    finally:
        await server.stop()


# --- what a server may send at most -----------------------------------------------------


async def test_a_body_read_whole_past_its_limit_fails_and_closes(
    session: UpstreamSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "MAX_BODY", 100_000)
    server = await serving(answer(b"z" * 100_001))
    try:
        with pytest.raises(ProtocolError, match="the reply's body passed"):
            await fetch(session, server.url())
        await settle()
        assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_body_at_its_limit_is_read(
    session: UpstreamSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "MAX_BODY", 100_000)
    server = await serving(answer(b"z" * 100_000))
    try:
        assert await fetch(session, server.url()) == (200, b"z" * 100_000)
    finally:
        await server.stop()


async def test_headers_past_their_limit_fail_the_exchange(session: UpstreamSession) -> None:
    many = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"p" * 1000) for n in range(MAX_HEAD // 1000 + 1))
    server = await serving(answer(extra=many))
    try:
        with pytest.raises(ProtocolError, match="the reply's headers passed 256 KiB"):
            await fetch(session, server.url())
        assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_compressed_reply_that_expands_too_far_fails(session: UpstreamSession) -> None:
    bomb = gzip.compress(b"\0" * (MAX_INFLATED + 1))  # some 16 kB on the wire
    server = await serving(answer(bomb, extra=b"Content-Encoding: gzip\r\n"))
    try:
        with pytest.raises(ProtocolError, match="a compressed piece of the reply passed 16 MiB"):
            await fetch(session, server.url())
        assert session.pool().open == 0
    finally:
        await server.stop()


def _endless_stream(piece: bytes) -> Respond:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()  # raises once the client has closed the connection

    return respond


@pytest.mark.parametrize(
    "piece",
    [b"data: " + b"x" * 4000, b"data: " + b"x" * 1000 + b"\n"],
    ids=["a line that never ends", "an event whose data lines never end"],
)
async def test_a_stream_event_past_its_limit_is_a_cut_stream(
    session: UpstreamSession, monkeypatch: pytest.MonkeyPatch, piece: bytes
) -> None:
    monkeypatch.setattr(common, "MAX_EVENT", 200_000)
    server = await serving(_endless_stream(piece))
    call = Call(base_url=server.url(), model="m", key="sk-canary-never-shown-0001")
    events = 0
    try:
        response = await session.request(server.url(), b"", {}, 5.0)
        try:
            with pytest.raises(UpstreamFailure) as failed:
                async for _ in sse_events(Streamed(response), call):
                    events += 1
        finally:
            response.release()
        assert events == 0
        failure = failed.value.failure
        assert "stream cut (protocol error)" in failure.message
        assert "an event of the stream passed" in failure.message
        assert "sk-canary" not in repr(failure)
        assert session.pool().open == 0
    finally:
        await server.stop()


# --- TLS --------------------------------------------------------------------------------


def certificate(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate and its key for ``name``, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
            *("-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_is_verified_against_the_servers_name(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = await Server(answer()).start(served)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with UpstreamSession(4, tls=trusting) as session:
            url = server.url("https", "localhost")
            assert await fetch(session, url) == (200, b'{"ok": true}')
            assert await fetch(session, url) == (200, b'{"ok": true}')
            assert len(set(server.peers)) == 1
        async with UpstreamSession(4) as session:  # the system's authorities: not trusted
            with pytest.raises(ConnectError, match="certificate verify failed"):
                await fetch(session, server.url("https", "localhost"))
            assert session.pool().open == 0
    finally:
        await server.stop()


async def test_a_response_is_released_once(session: UpstreamSession) -> None:
    server = await serving(answer())
    try:
        first: Response = await session.request(server.url(), b"", {}, 5.0)
        await first.conn.read_all()
        first.release()
        second = await session.request(server.url(), b"", {}, 5.0)
        first.release()  # again: must not hand back the connection the second call holds
        assert second.conn is first.conn and second.conn in session.pool().in_use
        await second.conn.read_all()
        second.release()
    finally:
        await server.stop()

"""Fuzzing the HTTP front's server: well-formed, mutated and random requests on one connection.

Each example serves a Site (routerd.fronts.http.server) on loopback with an app that reads
the whole body and answers its length, sends the bytes, half-closes, and reads until the
server closes. What must hold for every input: everything the server wrote is a sequence of
well-formed HTTP/1.1 responses, each 1xx, 200, 400 or 431; the app never fails and nothing
reaches the loop's exception handler; afterwards no request runs, no connection is open,
the connection cap is all given back, and a new client is served. ``ROUTERD_FUZZ_EXAMPLES``
raises the number of examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import anyio
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerd.fronts.http.asgi import Receive, Scope, Send
from routerd.fronts.http.connections import Gate
from routerd.fronts.http.server import Site
from tests.loopback import wait_until
from tests.test_http_server import accepting

EXAMPLES = int(os.environ.get("ROUTERD_FUZZ_EXAMPLES", "0")) or None
pytestmark = pytest.mark.timeout(90 + (EXAMPLES or 0) // 10)
LOOPS = {"asyncio": {"use_uvloop": False}, "uvloop": {"use_uvloop": True}}


async def length_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body (or until the client left) and answers its length."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    content = b"%d" % size
    headers = [(b"content-length", b"%d" % len(content)), (b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": content})


# ---- strategies --------------------------------------------------------------------------

token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode)
paths = st.one_of(
    st.sampled_from([b"/", b"/v1/chat/completions", b"/healthz", b"/a%2Fb", b"/%zz", b"*"]),
    st.text("abcxyz019/-._~%?=&", min_size=1, max_size=60).map(lambda t: b"/" + t.encode()),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + draw(paths) + b" " + version, b"host: routerd"]
    for name, text in draw(st.lists(st.tuples(token, value), max_size=4)):
        lines.append(name.encode() + b": " + text)
    if draw(st.booleans()):
        lines.append(b"connection: " + draw(st.sampled_from([b"close", b"keep-alive"])))
    if draw(st.integers(0, 5)) == 0:
        lines.append(b"expect: 100-continue")
    body = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        lines.append(b"content-length: %d" % len(body))
        framed = body
    else:
        lines.append(b"transfer-encoding: chunked")
        framed = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + framed


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "cut"]))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


streams = st.lists(
    st.one_of(requests(), mutated(), st.binary(max_size=200)), min_size=1, max_size=4
)


# ---- checks --------------------------------------------------------------------------------


class Responses:
    """The statuses of the responses in what the server wrote, parsed by llhttp."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.complete = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())

    def on_message_complete(self) -> None:
        self.complete += 1


SENTINEL = b"GET /last HTTP/1.1\r\nhost: routerd\r\nconnection: close\r\n\r\n"


async def converse(data: bytes, port: int) -> bytes:
    """Send ``data`` and a last request that closes; what the server wrote until it closed.

    Bytes that leave a head or a body unfinished hold the server waiting: after a short
    while the client half-closes, which ends the connection (as a client's hang-up does).
    """
    received = bytearray()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data + SENTINEL)
        with anyio.move_on_after(0.3):
            if await read_until_closed(stream, received):
                return bytes(received)
        await stream.send_eof()
        with anyio.fail_after(10):
            await read_until_closed(stream, received)
        return bytes(received)


async def read_until_closed(stream: anyio.abc.ByteStream, into: bytearray) -> bool:
    """Add what the server writes to ``into`` until it closes (True); the caller's scope
    bounds the wait."""
    try:
        while True:
            into += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True


async def serve_one(data: bytes) -> tuple[bytes, list[Any], Site, bytes]:
    """(what the server wrote, loop errors, the site after it, a later client's answer)."""
    errors: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    site = Site(length_app, Gate("tcp", 10), head_timeout_s=5.0, keepalive_s=5.0)
    async with accepting(site) as port:
        written = await converse(data, port)
        later = await converse(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc", port)
        await wait_until(lambda: not (site.tasks or site.connections))
    return written, errors, site, later


@pytest.mark.parametrize("loop", list(LOOPS))
@given(pieces=streams)
@settings(
    max_examples=EXAMPLES or 150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_any_bytes_get_well_formed_answers_and_leave_nothing_behind(
    loop: str, pieces: list[bytes]
) -> None:
    written, errors, site, later = anyio.run(
        serve_one, b"".join(pieces), backend="asyncio", backend_options=LOOPS[loop]
    )
    responses = Responses()
    with contextlib.suppress(httptools.HttpParserUpgrade):
        responses.parser.feed_data(written)
    # Whole responses only: each is written in one piece, or not at all.
    assert responses.complete == len(responses.statuses), written[:300]
    assert all(s < 200 or s in (200, 400, 431) for s in responses.statuses), responses.statuses
    assert errors == []
    assert site.gate.open == 0 and not site.tasks and not site.connections
    # The later client's request, then the closing one: answered 3 and 0 bytes long.
    assert later.startswith(b"HTTP/1.1 200 OK\r\n"), later
    assert b"\r\n\r\n3HTTP/1.1 200 OK\r\n" in later and later.endswith(b"\r\n\r\n0"), later

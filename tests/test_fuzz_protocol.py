"""Fuzzing the msgpack front: random, mutated and hostile frames, in process and end to end.

In process, a Connection serves a socket pair with a stand-in dispatcher that sends every
request on as JSON, as an upstream adapter would: whatever passes the edge checks must be
JSON a provider can read. End to end, one real daemon takes the same frames on its real Unix
socket while a well-behaved client stays connected throughout.

What must hold for every input: the daemon answers only in frames the client can decode; a
frame that cannot be trusted gets an Error without an id and then the connection closes; a
frame that names an id gets a reply for that id and the connection stays; no request ends in
an internal error; and the buffer budget is all given back. ``ROUTERD_FUZZ_EXAMPLES`` raises
the number of examples (default: a few hundred in process, fewer end to end).
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import msgspec
import pytest
from anyio.abc import UNIXSocketStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routerd_client import Client
from routerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Cancel,
    Chat,
    Chunk,
    DaemonMessage,
    Error,
    Hello,
    Result,
    Status,
    StatusReport,
    Welcome,
    client_decoder,
    daemon_decoder,
    encode_frame,
)

from routerd.core.calls import Delta, Reply
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.bounds import check_request, check_value
from routerd.fronts.budget import BufferBudget
from routerd.fronts.msgpack.framing import UNRESERVED_FRAME
from routerd.fronts.msgpack.guard import MAX_DEPTH, check_chat, peek_id
from routerd.fronts.msgpack.server import Connection
from routerd.fronts.msgpack.stream import TransportStream
from tests.conftest import DaemonFactory
from tests.test_e2e_hostile import chat_frame, nested, start
from tests.test_e2e_protocol import MockFactory, Raw, user

EXAMPLES = int(os.environ.get("ROUTERD_FUZZ_EXAMPLES", "0")) or None
# More examples need more time than the suite's per-test timeout (about 75 examples a second).
pytestmark = pytest.mark.timeout(60 + (EXAMPLES or 0) // 25)
HELLO = encode_frame(Hello(version=PROTOCOL_VERSION, client="fuzz"))
PROBE_ID = 2**64 - 3  # no generated id is this one
MAX_FRAME = 256 * 1024


def fuzz_settings(default_examples: int) -> settings:
    """Deterministic runs: derandomized, no example database, no per-example deadline."""
    return settings(
        max_examples=EXAMPLES or default_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- strategies --------------------------------------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-1000, max_value=1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=6),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), inner, max_size=4),
    ),
    max_leaves=16,
)


def wrap(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


deep_values = st.builds(wrap, values, st.integers(min_value=0, max_value=150))
contents = st.one_of(st.text(max_size=30), values, deep_values)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": contents},
        optional={"name": values, "tool_calls": values},
    ),
    max_size=3,
)
requests = st.fixed_dictionaries(
    {"messages": st.one_of(messages, messages, values)},
    optional={
        "max_tokens": st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(1, 64), values),
        "temperature": st.one_of(st.floats(), values),
        "tools": values,
        "stop": values,
        "model": values,
    },
)
ids = st.integers(min_value=-(2**63), max_value=2**64 - 4)
deadlines = st.one_of(
    st.none(),
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e300]),
    st.floats(min_value=0.5, max_value=20),
)
chats = st.builds(
    Chat,
    id=ids,
    route=st.sampled_from(["main", "mock/m1", "nope", "", "a/b/c"]),
    request=requests,
    stream=st.booleans(),
    deadline=deadlines,
    priority=st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-5, 5)),
)
well_formed = st.one_of(
    chats.map(encode_frame),
    chats.map(encode_frame),
    st.builds(Status, id=ids).map(encode_frame),
    st.builds(Cancel, id=ids).map(encode_frame),
)


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def deep_chat(request_id: int, depth: int) -> bytes:
    """A Chat whose content is nested ``depth`` levels deep: past what msgspec decodes."""
    return chat_frame(request_id, nested(depth))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame with bytes flipped, cut or added; its header still matches its body."""
    body = bytearray(draw(well_formed)[HEADER.size :])
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "cut", "extend", "insert"]))
        at = draw(st.integers(0, max(0, len(body) - 1)))
        if operation == "flip" and body:
            body[at] ^= draw(st.integers(1, 255))
        elif operation == "cut":
            del body[at:]
        elif operation == "extend":
            body += draw(st.binary(min_size=1, max_size=8))
        else:
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
    return frame(bytes(body))


random_msgpack = st.one_of(
    values.map(msgspec.msgpack.encode),
    st.dictionaries(st.sampled_from(["type", "id", "route", "request", "version"]), values).map(
        msgspec.msgpack.encode
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["chat", "status", "cancel", "hello", "x"]), "id": values}
    ).map(msgspec.msgpack.encode),
).map(frame)
# Well-formed msgpack that breaks the schema, under an id an Error can answer.
schema_breaking = st.fixed_dictionaries(
    {"type": st.sampled_from(["chat", "status", "cancel", "launch"]), "id": ids},
    optional={"route": values, "request": values, "stream": values, "priority": values},
).map(lambda message: frame(msgspec.msgpack.encode(message)))
framed = st.one_of(
    well_formed,
    well_formed,
    well_formed,
    schema_breaking,
    mutated(),
    random_msgpack,
    st.builds(deep_chat, ids, st.integers(min_value=60, max_value=3000)),
    st.binary(max_size=40).map(frame),
)
# Bytes that need not respect framing: a header promising more than follows (some past
# the size read without a budget reservation, some past max_frame), or noise.
tails = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda size, part: HEADER.pack(size) + part,
        st.one_of(
            st.integers(0, 300),
            st.integers(UNRESERVED_FRAME + 1, MAX_FRAME),
            st.integers(MAX_FRAME + 1, 2**32 - 1),
        ),
        st.binary(max_size=40),
    ),
)


# ---- what each frame should bring ---------------------------------------------------------


@dataclass
class Expected:
    """What a conversation should look like, frame by frame, up to the first that closes it."""

    replies: Counter[int] = field(default_factory=Counter)
    closes: bool = False


def expect(frames: list[bytes]) -> Expected:
    """The oracle: decode each frame as the daemon would, independently of how it does."""
    expected = Expected()
    for data in frames:
        body = data[HEADER.size :]
        try:
            message = client_decoder.decode(body)
        except msgspec.ValidationError:
            try:
                raw = msgspec.msgpack.decode(body)
            except (msgspec.DecodeError, UnicodeDecodeError):
                raw = None
            except RecursionError:
                raw = {"id": peek_id(body)}
            request_id = raw.get("id") if isinstance(raw, dict) else None
            if type(request_id) is not int:
                expected.closes = True
                return expected
            expected.replies[request_id] += 1
        except RecursionError:
            request_id = peek_id(body)
            if request_id is None:
                expected.closes = True
                return expected
            expected.replies[request_id] += 1
        except (msgspec.DecodeError, UnicodeDecodeError):
            expected.closes = True
            return expected
        else:
            if isinstance(message, Hello):
                expected.closes = True
                return expected
            if not isinstance(message, Cancel):
                expected.replies[message.id] += 1
    return expected


def check_conversation(
    replies: list[DaemonMessage], closed: bool, expected: Expected, *, complete: bool
) -> None:
    """The properties every conversation has; ``complete`` when nothing cut it short."""
    terminal: Counter[int] = Counter()
    for n, message in enumerate(replies):
        assert not isinstance(message, Welcome), message
        if isinstance(message, Error) and message.id is None:
            assert n == len(replies) - 1, f"frames after a connection-level Error: {replies}"
            assert closed, "a connection-level Error must close the connection"
            continue
        assert isinstance(message, Chunk | Result | Error | StatusReport), message
        assert message.id in expected.replies or message.id == PROBE_ID, (message, expected)
        if isinstance(message, Error):
            assert message.kind != "internal", message
        if not isinstance(message, Chunk) and message.id is not None:
            terminal[message.id] += 1
    terminal.pop(PROBE_ID, None)
    for request_id, count in terminal.items():
        assert count <= expected.replies[request_id], (request_id, replies)
    if complete and not expected.closes:
        assert terminal == expected.replies, (terminal, expected.replies, replies)
        assert not closed
    if complete and expected.closes:
        assert closed and replies, replies
        last = replies[-1]
        assert isinstance(last, Error) and last.id is None, last


# ---- in process ---------------------------------------------------------------------------


class JsonDispatcher:
    """Stands in for the dispatcher: sends the request on as strict JSON, replies at once."""

    async def chat(
        self,
        route_name: str,
        request: dict[str, Any],
        *,
        stream: bool = False,
        deadline: float | None = None,
        priority: int = 0,
        on_delta: Any = None,
        client: str = "",
        session: str | None = None,
    ) -> Reply:
        assert client.startswith(("pid:", "conn:")), client
        body = json.dumps(request, allow_nan=False)  # what an upstream adapter would send
        if on_delta is not None:
            await on_delta(Delta(text="chunk"))
        usage = dict(request.get("usage_for_test", {}))
        return Reply(body[:20], "m", "p", "c", "p/m", usage, [], "stop", None)

    def refused(self, kind: str) -> None:
        """A request refused before routing (counted by the real dispatcher)."""


def status_report(request_id: int) -> StatusReport:
    return StatusReport(request_id, "fuzz", 0.0, 1, 0, [], [], [])


class Conversation:
    """A Connection on one end of a socket pair, a test driving the other end."""

    def __init__(self, dispatcher: Any = None) -> None:
        self.dispatcher = dispatcher or JsonDispatcher()
        self.budget = BufferBudget(4 * MAX_FRAME)
        self.replies: list[DaemonMessage] = []
        self.closed = False
        self._pending = b""

    async def run(self, data: bytes, expected: Expected, *, then_eof: bool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        connection = Connection(
            await TransportStream.attach(theirs),
            cast(Dispatcher, self.dispatcher),
            max_frame=MAX_FRAME,
            status=status_report,
            draining=lambda: False,
            version="fuzz",
            budget=self.budget,
            read_timeout_s=0.5,
        )
        client = await UNIXSocketStream.from_socket(ours)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(connection.serve)
                await client.send(HELLO)
                assert isinstance(await self._next(client), Welcome)
                await client.send(data + encode_frame(Status(id=PROBE_ID)))
                if then_eof:
                    await client.send_eof()
                await self._collect(client, expected)
                await client.aclose()

    async def _next(self, client: UNIXSocketStream) -> DaemonMessage | None:
        while True:
            if len(self._pending) >= HEADER.size:
                (size,) = HEADER.unpack(self._pending[: HEADER.size])
                if len(self._pending) >= HEADER.size + size:
                    body = self._pending[HEADER.size : HEADER.size + size]
                    self._pending = self._pending[HEADER.size + size :]
                    return daemon_decoder.decode(body)
            try:
                self._pending += await client.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None

    async def _collect(self, client: UNIXSocketStream, expected: Expected) -> None:
        """Read until the connection closes, or every expected reply and the probe's came."""
        wanted = expected.replies + Counter({PROBE_ID: 1})
        seen: Counter[int] = Counter()
        while True:
            message = await self._next(client)
            if message is None:
                self.closed = True
                return
            self.replies.append(message)
            if isinstance(message, Result | Error | StatusReport) and message.id is not None:
                seen[message.id] += 1
            if not expected.closes and seen == wanted:
                return


@given(frames=st.lists(framed, max_size=6), tail=st.one_of(st.none(), tails))
@fuzz_settings(300)
def test_fuzzed_frames_in_process(frames: list[bytes], tail: bytes | None) -> None:
    expected = expect(frames)
    conversation = Conversation()
    data = b"".join(frames) + (tail or b"")
    anyio.run(lambda: conversation.run(data, expected, then_eof=tail is not None))
    check_conversation(conversation.replies, conversation.closed, expected, complete=tail is None)
    assert conversation.budget.used == 0, "a reservation outlived its frame"


class OverflowingDispatcher(JsonDispatcher):
    """Replies to requests that ask for it with usage msgpack cannot encode."""

    async def chat(self, route_name: str, request: dict[str, Any], **kwargs: Any) -> Reply:
        reply = await super().chat(route_name, request, **kwargs)
        if request.get("overflow"):
            reply.usage = {"tokens": 2**64}
        return reply


async def test_an_unencodable_reply_fails_only_its_request() -> None:
    conversation = Conversation(OverflowingDispatcher())
    bad = Chat(id=1, route="r", request={"messages": user("bad"), "overflow": True})
    good = Chat(id=2, route="r", request={"messages": user("fine")})
    expected = Expected(replies=Counter({1: 1, 2: 1}))
    await conversation.run(encode_frame(bad) + encode_frame(good), expected, then_eof=False)
    by_id = {m.id: m for m in conversation.replies if not isinstance(m, Welcome)}
    assert isinstance(by_id[1], Error) and by_id[1].kind == "internal", by_id[1]
    assert "could not encode" in by_id[1].message
    assert isinstance(by_id[2], Result), by_id[2]
    assert isinstance(by_id[PROBE_ID], StatusReport) and not conversation.closed


# ---- the edge checks on their own ---------------------------------------------------------


@given(request_id=ids, extra=st.dictionaries(st.text(max_size=5), values, max_size=4))
@fuzz_settings(200)
def test_peek_id_finds_what_msgspec_finds(request_id: int, extra: dict[str, Any]) -> None:
    message = {**extra, "id": request_id}
    assert peek_id(msgspec.msgpack.encode(message)) == request_id


@given(request=requests, depth=st.integers(0, 80))
@fuzz_settings(300)
def test_what_passes_the_edge_is_json_a_provider_can_read(
    request: dict[str, Any], depth: int
) -> None:
    request = {**request, "extra": wrap(request.get("messages"), depth)}
    problem = check_chat(Chat(id=1, route="r", request=request))
    # Exactly the nesting past the bound is refused: the request map is level 1.
    deep = check_chat(Chat(id=1, route="r", request={"extra": wrap(None, depth)}))
    assert (deep is not None) == (depth >= MAX_DEPTH), deep
    if problem is None:
        # It reaches the provider as JSON, unchanged.
        assert json.loads(json.dumps(request, allow_nan=False)) == request


@given(request=requests, depth=st.integers(0, 80), at=st.text(max_size=3))
@fuzz_settings(300)
def test_the_one_pass_check_agrees_with_the_check_of_each_value(
    request: dict[str, Any], depth: int, at: str
) -> None:
    request = {**request, at: wrap(request.get("messages"), depth)}
    each = next(
        (f"{key}: {p}" for key, v in request.items() if (p := check_value(v)) is not None), None
    )
    assert check_request(request) == each


# ---- end to end ---------------------------------------------------------------------------


def test_fuzzed_frames_against_the_real_daemon(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon, server=f"read_timeout_s = 1\nmax_frame = {MAX_FRAME}")
    with Client(str(routerd.socket_path), name="bystander", timeout=20) as bystander:
        assert bystander.chat("main", user("before")).text.endswith("before")
        examples = 0

        @given(frames=st.lists(framed, min_size=1, max_size=4), tail=st.one_of(st.none(), tails))
        @fuzz_settings(120)
        def example(frames: list[bytes], tail: bytes | None) -> None:
            nonlocal examples
            examples += 1
            expected = expect(frames)
            replies: list[DaemonMessage] = []
            closed = False
            with Raw(routerd.socket_path, timeout=20) as raw:
                raw.hello()
                raw.send(b"".join(frames) + (tail or b""))
                if tail is not None:
                    raw.sock.shutdown(socket.SHUT_WR)
                else:
                    raw.send(encode_frame(Status(id=PROBE_ID)))
                wanted = expected.replies + Counter({PROBE_ID: 1})
                seen: Counter[int] = Counter()
                while expected.closes or tail is not None or seen != wanted:
                    message = raw.recv()
                    if message is None:
                        closed = True
                        break
                    replies.append(message)
                    if (
                        isinstance(message, Result | Error | StatusReport)
                        and message.id is not None
                    ):
                        seen[message.id] += 1
            check_conversation(replies, closed, expected, complete=tail is None)
            if examples % 20 == 0:
                text = bystander.chat("main", user(f"during {examples}")).text
                assert text.endswith(f"during {examples}")

        example()
        assert routerd.process.poll() is None
        assert bystander.chat("main", user("after")).text.endswith("after")
        assert bystander.status().connections == 1
    log = routerd.log_text()
    assert "Traceback" not in log and "connection_crashed" not in log, log[-3000:]

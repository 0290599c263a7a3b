"""The sans-IO wire protocol: frames cut from bytes fed in any pieces, replies routed by id."""

from __future__ import annotations

import itertools
import queue

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routerd_client.errors import BadRequest, ProtocolError, RateLimited, RouterdError
from routerd_client.protocol import (
    HEADER,
    Chunk,
    DaemonMessage,
    Error,
    FrameTooLarge,
    Reloaded,
    Result,
    StatusReport,
    Welcome,
    encode_frame,
)
from routerd_client.wire import (
    ClientProtocol,
    ConnectionFailed,
    FrameDecoder,
    Reply,
    answer,
    check_request_size,
)


def frames_of(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (body := decoder.next_frame()) is not None:
        out.append(bytes(body))
    return out


def protocol(max_frame: int = 1 << 20) -> ClientProtocol[queue.SimpleQueue[Reply]]:
    return ClientProtocol(max_frame, queue.SimpleQueue.put)


def drain(replies: queue.SimpleQueue[Reply]) -> list[Reply]:
    out = []
    while not replies.empty():
        out.append(replies.get_nowait())
    return out


def test_frames_fed_byte_by_byte_come_out_whole_and_in_order() -> None:
    bodies = [b"a", b"", b"x" * 300, b"tail"]
    stream = b"".join(HEADER.pack(len(b)) + b for b in bodies)
    decoder = FrameDecoder(1024)
    out: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        out.extend(frames_of(decoder))
    assert out == bodies
    assert decoder.buffered == 0


@given(
    bodies=st.lists(st.binary(max_size=3000), max_size=8),
    cuts=st.lists(st.integers(0, 30000), max_size=12),
)
@settings(max_examples=200, deadline=None)
def test_any_split_of_a_stream_gives_back_the_same_frames(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(HEADER.pack(len(b)) + b for b in bodies)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    # A low exact_above sends the larger bodies through the exact-size buffer too.
    decoder = FrameDecoder(4096, exact_above=1000)
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(stream[start:end])
        out.extend(frames_of(decoder))
    assert out == bodies
    assert decoder.buffered == 0


def test_many_frames_in_one_feed() -> None:
    bodies = [bytes([n]) * n for n in range(1, 40)]
    decoder = FrameDecoder(1024)
    decoder.feed(b"".join(HEADER.pack(len(b)) + b for b in bodies))
    assert frames_of(decoder) == bodies


def test_a_half_frame_waits_for_the_rest() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(HEADER.pack(10) + b"12345")
    assert decoder.next_frame() is None
    assert decoder.frame_size() == 10
    assert decoder.buffered == 5
    decoder.feed(b"67890" + HEADER.pack(1))
    assert frames_of(decoder) == [b"1234567890"]
    assert decoder.buffered == 0
    assert decoder.frame_size() == 1


def test_oversize_header_is_refused_before_its_body() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(HEADER.pack(101)[:3])
    assert decoder.next_frame() is None
    decoder.feed(HEADER.pack(101)[3:])
    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_frame()
    assert (caught.value.size, caught.value.limit) == (101, 100)


def test_a_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(HEADER.pack(100) + b"y" * 100)
    assert frames_of(decoder) == [b"y" * 100]


def test_a_large_body_fills_one_exact_buffer_and_never_reads_past_it() -> None:
    body = bytes(range(256)) * 40
    decoder = FrameDecoder(1 << 20, exact_above=1000)
    decoder.feed(HEADER.pack(len(body)) + body[:10])
    assert decoder.frame_size() == len(body)
    fed = 10
    while (want := decoder.want()) and fed < len(body):
        assert want <= len(body) - fed
        decoder.feed(body[fed : fed + min(want, 777)])
        fed += min(want, 777)
    # Bytes past the body (the next frame) may still arrive with its end.
    decoder.feed(HEADER.pack(2) + b"ok")
    out = decoder.next_frame()
    assert isinstance(out, bytearray) and out == body
    assert frames_of(decoder) == [b"ok"]


def test_the_last_bytes_of_a_large_body_and_the_next_frame_in_one_feed() -> None:
    body = b"z" * 5000
    decoder = FrameDecoder(1 << 20, exact_above=1000)
    decoder.feed(HEADER.pack(len(body)) + body[:100])
    assert decoder.next_frame() is None
    decoder.feed(body[100:] + HEADER.pack(3) + b"abc")
    assert frames_of(decoder) == [body, b"abc"]


def test_clear_drops_a_frame_under_way_and_its_buffer() -> None:
    decoder = FrameDecoder(1 << 20, exact_above=1000)
    decoder.feed(HEADER.pack(5000) + b"a" * 100)
    assert decoder.next_frame() is None
    decoder.feed(b"b" * 100)  # now in the body's own buffer of 5000 bytes
    assert decoder.buffered == 200
    decoder.clear()
    assert decoder.buffered == 0
    assert decoder.frame_size() is None
    decoder.feed(HEADER.pack(2) + b"ok")
    assert frames_of(decoder) == [b"ok"]


def test_garbled_bytes_fail_the_connection_for_every_request() -> None:
    proto = protocol()
    first: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    second: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    proto.pending.update({1: first, 2: second})
    with pytest.raises(ConnectionFailed) as caught:
        for byte in HEADER.pack(3) + b"\xc1\xc1\xc1":
            proto.receive_data(bytes([byte]))
    proto.fail_all(caught.value.failure)
    assert not proto.pending
    errors = drain(first) + drain(second)
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert all(isinstance(e, ProtocolError) and "cannot read" in str(e) for e in errors)


def test_oversize_frame_from_the_daemon_fails_the_connection() -> None:
    proto = protocol(max_frame=50)
    with pytest.raises(ConnectionFailed) as caught:
        proto.receive_data(HEADER.pack(51))
    error = caught.value.failure()
    assert isinstance(error, ProtocolError) and "51 bytes" in str(error)


def test_replies_go_to_their_request_and_terminal_ones_end_it() -> None:
    proto = protocol()
    streamed: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    status: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    proto.pending.update({7: streamed, 8: status})
    result = Result(id=7, text="hi", model="m", provider="p", credential="c", target="t")
    report = StatusReport(8, "v", 1.0, 1, 0, [], [], [])
    messages: list[DaemonMessage] = [
        Chunk(id=7, text="h"),
        Chunk(id=99, text="nobody waits"),
        Chunk(id=7, text="i"),
        report,
        result,
        Result(id=7, text="late", model="m", provider="p", credential="c", target="t"),
        Reloaded(id=12, summary="nobody asked"),
    ]
    stream = b"".join(encode_frame(m) for m in messages)
    for i in range(0, len(stream), 5):
        proto.receive_data(stream[i : i + 5])
    assert drain(streamed) == [Chunk(id=7, text="h"), Chunk(id=7, text="i"), result]
    assert drain(status) == [report]
    assert proto.pending == {}


def test_an_error_with_an_id_ends_only_its_request() -> None:
    proto = protocol()
    failing: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    other: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    proto.pending.update({1: failing, 2: other})
    proto.receive_data(encode_frame(Error(1, "rate_limited", "slow down", retry_after=2.0)))
    assert list(proto.pending) == [2]
    (item,) = drain(failing)
    with pytest.raises(RateLimited) as caught:
        answer(item)
    assert caught.value.retry_after == 2.0


def test_a_connection_level_error_fails_the_connection_with_its_class() -> None:
    proto = protocol()
    waiting: queue.SimpleQueue[Reply] = queue.SimpleQueue()
    proto.pending[3] = waiting
    data = encode_frame(Welcome(1, "routerd", 100)) + encode_frame(
        Error(None, "unavailable", "too many connections", retry_after=1.0)
    )
    with pytest.raises(ConnectionFailed) as caught:
        proto.receive_data(data)
    proto.fail_all(caught.value.failure)
    (item,) = drain(waiting)
    assert isinstance(item, RouterdError) and item.kind == "unavailable"
    assert "too many connections" in str(item)


def test_next_message_hands_out_the_handshake_reply() -> None:
    proto = protocol()
    welcome = Welcome(1, "routerd test", 4096)
    frame = encode_frame(welcome)
    proto.frames.feed(frame[:3])
    assert proto.next_message() is None
    proto.frames.feed(frame[3:])
    assert proto.next_message() == welcome
    assert proto.next_message() is None


def test_answer_passes_replies_and_raises_failures() -> None:
    chunk = Chunk(id=1, text="x")
    assert answer(chunk) is chunk
    failure = ProtocolError("gone")
    with pytest.raises(ProtocolError) as caught:
        answer(failure)
    assert caught.value is failure


def test_request_above_the_daemons_max_frame_is_refused() -> None:
    welcome = Welcome(1, "routerd", 10)
    check_request_size(HEADER.pack(10) + b"x" * 10, welcome)
    with pytest.raises(BadRequest, match="11 bytes"):
        check_request_size(HEADER.pack(11) + b"x" * 11, welcome)


def test_a_schema_breaking_message_is_undecodable() -> None:
    proto = protocol()
    body = msgspec.msgpack.encode({"type": "chunk", "id": "seven"})
    with pytest.raises(ConnectionFailed) as caught:
        proto.receive_data(HEADER.pack(len(body)) + body)
    assert isinstance(caught.value.failure(), ProtocolError)

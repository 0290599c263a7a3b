"""The msgpack socket's connections on asyncio transports, on both event loops: what a client
sends is bounded in memory, a client that reads nothing holds the writer back, and the ends
of a connection surface as anyio's exceptions."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

from routerd.fronts.msgpack.stream import INBOX_HIGH, TransportStream, UnixListener, bind_unix
from routerd.fronts.peers import peer_of
from tests.loopback import wait_until
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def inbox_size(stream: TransportStream) -> int:
    return stream._inbox.size


async def test_bytes_arrive_in_order_and_a_flood_is_held_in_the_kernel(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    stream = await TransportStream.attach(accepted)
    payload = os.urandom(4 * 1024 * 1024)
    sent = 0
    # The client writes as much as the kernel takes while the daemon reads nothing.
    with anyio.move_on_after(2):
        while sent < len(payload):
            try:
                sent += client.send(payload[sent : sent + 65536])
            except BlockingIOError:
                await anyio.sleep(0.01)
    await anyio.sleep(0.1)
    assert sent < len(payload), "the kernel took everything: nothing was held back"
    # The transport stopped reading: what waits here is bounded, the rest is the kernel's.
    assert stream._inbox.paused_reading
    assert inbox_size(stream) < INBOX_HIGH + 256 * 1024

    received = bytearray()

    async def drain_client() -> None:
        nonlocal sent
        while sent < len(payload):
            try:
                sent += client.send(payload[sent : sent + 65536])
            except BlockingIOError:
                await anyio.sleep(0.001)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_client)
            while len(received) < len(payload):
                received += await stream.receive(100_000)
    assert bytes(received) == payload
    await stream.aclose()


async def test_receive_takes_no_more_than_asked(pair: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = pair
    stream = await TransportStream.attach(accepted)
    client.send(b"0123456789")
    with anyio.fail_after(5):
        assert await stream.receive(4) == b"0123"
        assert await stream.receive(100) == b"456789"
    await stream.aclose()


async def test_the_client_closing_is_end_of_stream_and_a_broken_send(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    stream = await TransportStream.attach(accepted)
    client.send(b"last words")
    client.shutdown(socket.SHUT_WR)
    with anyio.fail_after(5):
        assert await stream.receive() == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        # Half-closed: the daemon may still answer.
        await stream.send(b"reply")
        assert client.recv(100) == b"reply"
        client.close()
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(100):  # the kernel reports the reset on a later write
                await stream.send(b"x" * 65536)
                await anyio.sleep(0.01)
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


async def test_a_client_that_reads_nothing_holds_the_writer_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    stream = await TransportStream.attach(accepted)
    frame = b"y" * 65536
    written = 0
    with anyio.move_on_after(1) as waiting:
        while True:
            await stream.send(frame)
            written += len(frame)
    assert waiting.cancelled_caught, "send never waited for a client that reads nothing"
    assert stream._inbox.paused_writing
    assert written < 16 * 1024 * 1024

    # Once the client reads, the writer goes on, and every byte arrives in order.
    total = 0

    async def read_all() -> None:
        nonlocal total
        while True:
            try:
                data = client.recv(1 << 20)
            except BlockingIOError:
                await anyio.sleep(0.001)
                continue
            if not data:
                return
            assert set(data) == {ord("y")}
            total += len(data)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            await stream.send(frame)
            await stream.send_eof()
    # The frame cancelled mid-wait was already in the transport: it is delivered too.
    assert total >= written + len(frame)
    await stream.aclose()


async def test_the_listener_binds_with_its_mode_and_knows_the_peer(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = UnixListener(bind_unix(path, 0o600))
    assert path.stat().st_mode & 0o777 == 0o600
    with anyio.fail_after(5):
        async with await anyio.connect_unix(path) as client:
            stream = await listener.accept()
            raw = stream.extra(SocketAttribute.raw_socket)
            peer = peer_of(raw)
            assert peer is not None and peer.pid == os.getpid()
            await client.send(b"hi")
            assert await stream.receive() == b"hi"
            await stream.send(b"there")
            assert await client.receive() == b"there"
            await stream.aclose()
    await listener.aclose()


class RecordedWrites:
    """The stream's transport, every write it is given recorded."""

    def __init__(self, transport: object) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self._transport.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


async def received_until_eof(sock: socket.socket) -> bytes:
    """What the client's socket receives until the end of stream (within 5 s), read without
    blocking the loop that writes it."""
    sock.setblocking(False)
    data = b""
    with anyio.fail_after(5):
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await anyio.sleep(0.01)
                continue
            if not chunk:
                return data
            data += chunk


async def test_held_frames_leave_together_at_the_turns_end_and_before_anything_else(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    attached = await TransportStream.attach(accepted)
    recorded = RecordedWrites(attached._transport)
    stream = TransportStream(accepted, recorded, attached._inbox)  # type: ignore[arg-type]

    assert stream.hold(b"a") and stream.hold(b"b") and stream.hold(b"c")
    assert recorded.writes == []  # nothing yet: the loop has not turned
    await wait_until(lambda: bool(recorded.writes))
    assert recorded.writes == [b"abc"]

    assert stream.hold(b"d")
    await stream.send(b"e")  # a frame sent at once takes what is held with it, first
    assert recorded.writes[1:] == [b"de"]
    await anyio.sleep(0.01)
    assert len(recorded.writes) == 2  # the turn's end found nothing left to write

    stream._inbox.paused_writing = True  # a client that stopped reading: send() must wait
    assert not stream.hold(b"x")
    stream._inbox.paused_writing = False

    assert stream.hold(b"f")
    await stream.aclose()  # what is held is written before the connection closes
    assert recorded.writes[2:] == [b"f"]
    assert await received_until_eof(client) == b"abcdef"


async def test_what_is_held_is_written_before_the_end_of_stream(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    stream = await TransportStream.attach(accepted)
    assert stream.hold(b"last words")
    await stream.send_eof()  # as linger_and_close ends a connection
    assert await received_until_eof(client) == b"last words"
    await stream.aclose()

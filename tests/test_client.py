"""The thin client against a fake daemon that speaks the real wire protocol on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
from routerd_client import (
    PROTOCOL_VERSION,
    AsyncClient,
    Attempt,
    BadRequest,
    Client,
    ContextTierDowngrade,
    DeadlineExceeded,
    LongContextLimited,
    ProtocolError,
    RateLimited,
    RouterdError,
    TargetDown,
    Unavailable,
    UnknownRoute,
    default_socket_path,
    error_from_message,
)
from routerd_client import paths as paths_module
from routerd_client.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    Cancel,
    Chat,
    Chunk,
    ClientMessage,
    DaemonMessage,
    Error,
    Hello,
    Result,
    RouteStatus,
    Status,
    StatusReport,
    Welcome,
    client_decoder,
    encode_frame,
)

# ---- the fake daemon --------------------------------------------------------------------


def _welcome(max_frame: int = DEFAULT_MAX_FRAME) -> Welcome:
    return Welcome(version=PROTOCOL_VERSION, server="fake-routerd", max_frame=max_frame)


class FakeDaemon:
    """An asyncio Unix-socket server in its own thread, driven by the requests it gets.

    A chat's ``request`` carries test knobs next to the messages: ``delay`` (seconds before
    replying), ``gated`` (wait for release() first, then the delay), ``chunk_delay``
    (between stream chunks), ``fail`` (reply an Error of that
    class), ``corrupt`` (a connection-level Error, then hang up), ``oversize`` (a frame
    header announcing 50 MB and no body). Otherwise it echoes the last message's content,
    word by word as Chunks when streaming.
    """

    def __init__(self, path: str, hello_reply: DaemonMessage | None = None) -> None:
        self.path = path
        self.hello_reply = hello_reply if hello_reply is not None else _welcome()
        self.hellos: list[Hello] = []
        self.received: list[ClientMessage] = []
        self.replied: list[int] = []
        self.cancelled: list[int] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._gate: asyncio.Event | None = None
        self._reading: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(5), "fake daemon did not start"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate`` (called under the daemon's lock) holds."""
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "the fake daemon never saw it"

    def release(self) -> None:
        """Let every ``gated`` request start its delay, all from the same instant."""
        assert self._loop is not None and self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    def pause_reading(self, paused: bool = True) -> None:
        """Stop (or go back to) reading requests after the handshake, as a stopped daemon
        would: a large frame then fills the socket and the client's send blocks."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._pause, paused)

    def _pause(self, paused: bool) -> None:
        assert self._reading is not None
        if paused:
            self._reading.clear()  # connections to come stop after their handshake
        else:
            self._reading.set()
        for writer in self._writers:  # and those open now at once
            transport = writer.transport
            transport.pause_reading() if paused else transport.resume_reading()  # type: ignore[attr-defined]

    def drop_connections(self) -> None:
        """Hang up on every client, as a crashing daemon would."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._close_writers)

    def _close_writers(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def of_type(self, kind: type[Any]) -> list[Any]:
        with self._cond:
            return [m for m in self.received if isinstance(m, kind)]

    def _record(self, into: list[Any], item: Any) -> None:
        with self._cond:
            into.append(item)
            self._cond.notify_all()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._gate = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        server = await asyncio.start_unix_server(self._serve, self.path)
        self._ready.set()
        async with server:
            await self._stop.wait()
            self._close_writers()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        tasks: dict[int, asyncio.Task[None]] = {}
        try:
            hello = await _read_message(reader)
            assert isinstance(hello, Hello)
            self._record(self.hellos, hello)
            writer.write(encode_frame(self.hello_reply))
            if not isinstance(self.hello_reply, Welcome):
                return
            while True:
                assert self._reading is not None
                await self._reading.wait()
                message = await _read_message(reader)
                self._record(self.received, message)
                if isinstance(message, Chat):
                    tasks[message.id] = asyncio.create_task(self._reply(message, writer))
                elif isinstance(message, Cancel):
                    task = tasks.pop(message.id, None)
                    if task is not None:
                        task.cancel()
                elif isinstance(message, Status):
                    writer.write(encode_frame(_status_report(message.id)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _reply(self, chat: Chat, writer: asyncio.StreamWriter) -> None:
        request = chat.request
        try:
            if request.get("gated"):
                assert self._gate is not None
                await self._gate.wait()
            await asyncio.sleep(request.get("delay", 0))
            # Recorded before the write, so a test that has its reply also sees the record.
            self._record(self.replied, chat.id)
            if "fail" in request:
                writer.write(encode_frame(_error(chat.id, request["fail"], request)))
            elif request.get("corrupt"):
                writer.write(encode_frame(Error(id=None, kind="protocol_error", message="bad")))
                writer.close()
            elif request.get("oversize"):
                writer.write(HEADER.pack(50_000_000))
            else:
                text = request["messages"][-1]["content"]
                if chat.stream:
                    for word in text.split():
                        writer.write(encode_frame(Chunk(id=chat.id, text=word + " ")))
                        await asyncio.sleep(request.get("chunk_delay", 0))
                writer.write(encode_frame(_result(chat.id, text)))
        except asyncio.CancelledError:
            self._record(self.cancelled, chat.id)
            raise


async def _read_message(reader: asyncio.StreamReader) -> ClientMessage:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
    return client_decoder.decode(await reader.readexactly(size))


ATTEMPTS = [
    Attempt(target="anthropic/claude", credential="team", outcome="rate_limited", status=429),
    Attempt(target="openai/gpt-4.1", credential="main", outcome="target_down", status=503),
]


def _error(rid: int, kind: str, request: dict[str, Any]) -> Error:
    return Error(
        id=rid,
        kind=kind,
        message=f"{kind} on every candidate",
        retry_after=request.get("retry_after"),
        attempts=ATTEMPTS,
        details=request.get("details"),
    )


def _result(rid: int, text: str) -> Result:
    return Result(
        id=rid,
        text=text,
        model="fake-model",
        provider="fake",
        credential="main",
        target="fake/fake-model",
        usage={"prompt_tokens": 3, "completion_tokens": len(text.split())},
        attempts=[Attempt(target="fake/fake-model", credential="main", outcome="ok", status=200)],
        finish_reason="stop",
    )


def _status_report(rid: int) -> StatusReport:
    return StatusReport(
        id=rid,
        version="0.1.0",
        uptime_s=1.5,
        connections=1,
        in_flight=0,
        credentials=[],
        targets=[],
        routes=[RouteStatus(name="default", chain=["fake/fake-model"])],
    )


def say(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def sock_path(short_dir: Path) -> str:
    return str(short_dir / "routerd.sock")


@pytest.fixture
def daemon(sock_path: str) -> Iterator[FakeDaemon]:
    with FakeDaemon(sock_path) as fake:
        yield fake


def no_reader_threads() -> bool:
    return not any(t.name.startswith("routerd-client") for t in threading.enumerate())


# ---- the sync Client --------------------------------------------------------------------


def test_handshake_sends_version_and_name(daemon: FakeDaemon) -> None:
    with Client(daemon.path, name="agent-7"):
        daemon.wait_for(lambda: len(daemon.hellos) == 1)
    with Client(daemon.path):
        daemon.wait_for(lambda: len(daemon.hellos) == 2)
    assert daemon.hellos[0] == Hello(version=PROTOCOL_VERSION, client="agent-7")
    assert daemon.hellos[1].client == f"{os.path.basename(sys.argv[0])}:{os.getpid()}"
    assert no_reader_threads()


def test_socket_comes_from_the_environment(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTERD_SOCKET", daemon.path)
    with Client() as c:
        assert c.chat("default", say("hello there")).text == "hello there"


def test_chat_returns_the_result(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c:
        r = c.chat("default", say("hi there"), max_tokens=64, temperature=0.2, priority=3)
    assert (r.text, r.model, r.provider, r.credential) == ("hi there", "fake-model", "fake", "main")
    assert r.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert [a.outcome for a in r.attempts] == ["ok"]
    [chat] = daemon.of_type(Chat)
    assert chat.route == "default" and chat.priority == 3 and not chat.stream
    assert chat.request == {"messages": say("hi there"), "max_tokens": 64, "temperature": 0.2}


def test_status(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c:
        report = c.status()
    assert report.routes == [RouteStatus(name="default", chain=["fake/fake-model"])]


def test_threads_share_one_connection_and_get_their_own_replies(daemon: FakeDaemon) -> None:
    delays = [0.05, 0.04, 0.03, 0.02, 0.01, 0.0]
    with Client(daemon.path) as c, ThreadPoolExecutor(len(delays)) as pool:
        futures = [
            pool.submit(c.chat, "default", say(f"request {i}"), delay=delay, gated=True)
            for i, delay in enumerate(delays)
        ]
        daemon.wait_for(lambda: len(daemon.received) == len(delays))
        daemon.release()
        texts = [f.result(timeout=5).text for f in futures]
    assert texts == [f"request {i}" for i in range(len(delays))]
    assert len(daemon.hellos) == 1
    assert_answered_out_of_order(daemon)


def assert_answered_out_of_order(daemon: FakeDaemon) -> None:
    # Released together, the shortest delay answers first: the reverse of the sending order,
    # so each caller got its own reply only because the client matched ids.
    chats = daemon.of_type(Chat)
    sent = [m.id for m in chats]
    assert daemon.replied == [m.id for m in sorted(chats, key=lambda m: m.request["delay"])]
    assert daemon.replied != sent


def test_stream_yields_chunks_then_result(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c:
        stream = c.stream("default", say("one two three"))
        texts = [chunk.text for chunk in stream]
    assert texts == ["one ", "two ", "three "]
    assert stream.result is not None and stream.result.text == "one two three"
    assert daemon.of_type(Chat)[0].stream


def test_breaking_out_of_a_stream_cancels_it(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c:
        for chunk in c.stream("default", say("a b c d e f g h"), chunk_delay=0.05):
            assert chunk.text == "a "
            break
        daemon.wait_for(lambda: len(daemon.cancelled) == 1)
        # The connection carries on, and the cancelled stream's late chunks go nowhere.
        assert c.chat("default", say("still here")).text == "still here"
    assert daemon.of_type(Cancel) == [Cancel(id=daemon.cancelled[0])]


def test_closing_a_stream_cancels_it_once_and_not_after_it_ended(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c:
        with c.stream("default", say("a b c d e f"), chunk_delay=0.05) as stream:
            next(stream)
        daemon.wait_for(lambda: len(daemon.cancelled) == 1)
        stream.close()
        with c.stream("default", say("done")) as finished:
            list(finished)
    assert len(daemon.of_type(Cancel)) == 1
    assert finished.result is not None


def test_timeout_raises_and_cancels(daemon: FakeDaemon) -> None:
    with Client(daemon.path, timeout=0.1) as c:
        with pytest.raises(DeadlineExceeded, match=r"within 0\.1 s"):
            c.chat("default", say("slow"), delay=5)
        daemon.wait_for(lambda: len(daemon.cancelled) == 1)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("rate_limited", RateLimited),
        ("target_down", TargetDown),
        ("unknown_route", UnknownRoute),
        ("something_new", RouterdError),
    ],
)
def test_error_reply_raises_the_class_with_its_attempts(
    daemon: FakeDaemon, kind: str, cls: type[RouterdError]
) -> None:
    with Client(daemon.path) as c, pytest.raises(cls) as caught:
        c.chat("default", say("x"), fail=kind, retry_after=2.5)
    err = caught.value
    assert type(err) is cls and err.kind == kind
    assert err.attempts == ATTEMPTS and err.retry_after == 2.5
    assert str(err) == (
        f"{kind} on every candidate [anthropic/claude/team: rate_limited (429); "
        "openai/gpt-4.1/main: target_down (503)]"
    )


def test_context_tier_downgrade_carries_its_details(daemon: FakeDaemon) -> None:
    details = {"largest_window": 200000, "long_lane_back_in": 42.0}
    with Client(daemon.path) as c, pytest.raises(LongContextLimited) as caught:
        c.chat("default", say("x"), fail="context_tier_downgrade", details=details)
    err = caught.value
    assert isinstance(err, ContextTierDowngrade)
    assert (err.largest_window, err.long_lane_back_in) == (200000, 42.0)


def test_connection_drop_fails_every_pending_request_then_reconnects(
    daemon: FakeDaemon,
) -> None:
    with Client(daemon.path) as c, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(c.chat, "default", say("x"), delay=5) for _ in range(3)]
        daemon.wait_for(lambda: len(daemon.received) == 3)
        daemon.drop_connections()
        for future in futures:
            with pytest.raises(Unavailable, match="routerd closed the connection"):
                future.result(timeout=5)
        assert c.chat("default", say("back again")).text == "back again"
    assert len(daemon.hellos) == 2
    assert no_reader_threads()


# A frame that fills the socket of a daemon that reads nothing, so its send blocks.
BIG = "x" * (4 << 20)


class _Interrupted(Exception):
    """What the test's alarm raises in the middle of a blocked send (as Ctrl-C would)."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_a_send_cut_short_ends_its_connection_and_the_next_request_opens_another(
    daemon: FakeDaemon,
) -> None:
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        with Client(daemon.path, timeout=5) as c:
            assert c.chat("default", say("first")).text == "first"
            daemon.pause_reading()
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(_Interrupted):
                c.chat("default", say(BIG))
            daemon.pause_reading(False)
            # Not into the middle of the frame cut short: on a connection of its own.
            assert c.chat("default", say("after")).text == "after"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(daemon.hellos) == 2


def test_a_client_dropped_without_close_lets_its_connection_go(daemon: FakeDaemon) -> None:
    for n in range(3):
        assert Client(daemon.path).chat("default", say(f"turn {n}")).text == f"turn {n}"
    gc.collect()
    deadline = time.monotonic() + 5
    while not no_reader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert no_reader_threads()


def test_connection_level_error_fails_every_pending_request(daemon: FakeDaemon) -> None:
    with Client(daemon.path) as c, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.chat, "default", say("x"), delay=5)
        daemon.wait_for(lambda: len(daemon.received) == 1)
        with pytest.raises(ProtocolError, match="bad"):
            c.chat("default", say("x"), corrupt=True)
        with pytest.raises(ProtocolError, match="bad"):
            pending.result(timeout=5)


def test_oversized_frame_from_daemon_is_refused_before_its_body(daemon: FakeDaemon) -> None:
    # The fake never sends the 50 MB body: a client that tried to read it would time out.
    refused = pytest.raises(ProtocolError, match="50000000 bytes, above this client's max_frame")
    with Client(daemon.path, max_frame=4096, timeout=5) as c, refused:
        c.chat("default", say("x"), oversize=True)


def test_request_above_daemon_max_frame_is_refused_locally(sock_path: str) -> None:
    with FakeDaemon(sock_path, hello_reply=_welcome(max_frame=1000)) as fake:
        with Client(fake.path) as c:
            with pytest.raises(BadRequest, match="above routerd's max_frame of 1000"):
                c.chat("default", say("x" * 2000))
            assert c.chat("default", say("small")).text == "small"
        assert len(fake.of_type(Chat)) == 1


def test_version_mismatch_is_a_protocol_error(sock_path: str) -> None:
    wrong = Welcome(version=PROTOCOL_VERSION + 1, server="future", max_frame=DEFAULT_MAX_FRAME)
    refused = pytest.raises(ProtocolError, match=f"protocol version {PROTOCOL_VERSION + 1}")
    with FakeDaemon(sock_path, hello_reply=wrong), refused:
        Client(sock_path).connect()


def test_error_reply_to_hello_is_a_protocol_error(sock_path: str) -> None:
    refusal = Error(id=None, kind="protocol_error", message="unsupported protocol version 1")
    refused = pytest.raises(ProtocolError, match="unsupported protocol version 1")
    with FakeDaemon(sock_path, hello_reply=refusal), refused:
        Client(sock_path).connect()


def test_missing_socket_is_unavailable_naming_the_path(sock_path: str) -> None:
    with pytest.raises(Unavailable) as caught:
        Client(sock_path).chat("default", say("x"))
    assert sock_path in str(caught.value) and "routerd serve" in str(caught.value)


def test_refused_socket_is_unavailable(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays behind, as after a daemon crash
    with pytest.raises(Unavailable, match="refused"):
        Client(sock_path).connect()


def test_silent_daemon_fails_the_handshake_in_time(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(sock_path)
        mute.listen()  # accepts into the backlog, never answers
        with pytest.raises(Unavailable, match=r"did not answer hello within 0\.1 s"):
            Client(sock_path, timeout=0.1).connect()
        with pytest.raises(Unavailable, match=r"did not answer hello within 0\.1 s"):
            asyncio.run(AsyncClient(sock_path, timeout=0.1).connect())


def test_close_fails_pending_requests_and_later_calls(daemon: FakeDaemon) -> None:
    c = Client(daemon.path)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(c.chat, "default", say("x"), delay=5)
        daemon.wait_for(lambda: len(daemon.received) == 1)
        c.close()
        with pytest.raises(Unavailable, match="client was closed"):
            pending.result(timeout=5)
    with pytest.raises(Unavailable, match="client was closed"):
        c.chat("default", say("x"))
    assert no_reader_threads()


# ---- the AsyncClient --------------------------------------------------------------------


def no_reader_tasks() -> bool:
    return not any(t.get_name().startswith("routerd-client") for t in asyncio.all_tasks())


async def async_wait_for(daemon: FakeDaemon, predicate: Callable[[], bool]) -> None:
    # The fake daemon records from its own thread; wait there without blocking this loop.
    await asyncio.to_thread(daemon.wait_for, predicate)


async def test_async_chat_and_status(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path, name="async-agent") as c:
        r = await c.chat("default", say("hi async"), max_tokens=8)
        report = await c.status()
    assert r.text == "hi async" and r.credential == "main"
    assert report.uptime_s == 1.5
    assert daemon.hellos == [Hello(version=PROTOCOL_VERSION, client="async-agent")]
    assert no_reader_tasks()


async def test_async_tasks_share_one_connection(daemon: FakeDaemon) -> None:
    delays = [0.04, 0.03, 0.02, 0.01, 0.0]
    async with AsyncClient(daemon.path) as c:
        calls = asyncio.gather(
            *(
                c.chat("default", say(f"task {i}"), delay=d, gated=True)
                for i, d in enumerate(delays)
            )
        )
        await async_wait_for(daemon, lambda: len(daemon.received) == len(delays))
        daemon.release()
        results = await calls
    assert [r.text for r in results] == [f"task {i}" for i in range(len(delays))]
    assert len(daemon.hellos) == 1
    assert_answered_out_of_order(daemon)


async def test_async_stream_yields_chunks_then_result(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path) as c:
        stream = c.stream("default", say("one two three"))
        texts = [chunk.text async for chunk in stream]
    assert texts == ["one ", "two ", "three "]
    assert stream.result is not None and stream.result.text == "one two three"


async def test_async_breaking_out_of_a_stream_cancels_it(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path) as c:
        async for chunk in c.stream("default", say("a b c d e f g"), chunk_delay=0.05):
            assert chunk.text == "a "
            break
        await async_wait_for(daemon, lambda: len(daemon.cancelled) == 1)
        async with c.stream("default", say("p q r s t"), chunk_delay=0.05) as stream:
            await stream.__anext__()
        await async_wait_for(daemon, lambda: len(daemon.cancelled) == 2)
        assert (await c.chat("default", say("still here"))).text == "still here"
    assert len(daemon.of_type(Cancel)) == 2


async def test_async_task_cancellation_cancels_the_request(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path) as c:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await c.chat("default", say("slow"), delay=5)
        await async_wait_for(daemon, lambda: len(daemon.cancelled) == 1)


async def test_async_timeout_raises_and_cancels(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path, timeout=0.1) as c:
        with pytest.raises(DeadlineExceeded, match=r"within 0\.1 s"):
            await c.chat("default", say("slow"), delay=5)
        await async_wait_for(daemon, lambda: len(daemon.cancelled) == 1)


async def test_async_error_reply_raises_the_class(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path) as c:
        with pytest.raises(RateLimited) as caught:
            await c.chat("default", say("x"), fail="rate_limited", retry_after=1.0)
    assert caught.value.attempts == ATTEMPTS and caught.value.retry_after == 1.0


async def test_async_connection_drop_fails_every_pending_request(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path) as c:
        pending = [asyncio.create_task(c.chat("default", say("x"), delay=5)) for _ in range(3)]
        await async_wait_for(daemon, lambda: len(daemon.received) == 3)
        daemon.drop_connections()
        for task in pending:
            with pytest.raises(Unavailable, match="routerd closed the connection"):
                await task
        assert (await c.chat("default", say("back"))).text == "back"
    assert len(daemon.hellos) == 2
    assert no_reader_tasks()


async def test_async_cancelling_a_request_mid_send_cancels_it_at_the_daemon(
    daemon: FakeDaemon,
) -> None:
    async with AsyncClient(daemon.path) as c:
        assert (await c.chat("default", say("first"))).text == "first"
        daemon.pause_reading()
        task = asyncio.create_task(c.chat("default", say(BIG), delay=5))
        await asyncio.sleep(0.3)  # the frame is written, the send waits for room
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        daemon.pause_reading(False)
        # The frame reaches the daemon whole, and its Cancel right behind it.
        await async_wait_for(daemon, lambda: len(daemon.received) == 3)
        chats, cancels = daemon.of_type(Chat), daemon.of_type(Cancel)
        assert [cancel.id for cancel in cancels] == [chats[1].id]
        assert (await c.chat("default", say("next"))).text == "next"


async def test_async_a_failed_send_lets_the_next_request_open_a_new_connection(
    daemon: FakeDaemon,
) -> None:
    async with AsyncClient(daemon.path) as c:
        assert (await c.chat("default", say("first"))).text == "first"
        daemon.drop_connections()
        # This loop busy while the daemon hangs up: the client's reader cannot see it go.
        time.sleep(0.3)  # noqa: ASYNC251 (blocking the loop is the point)
        with pytest.raises(Unavailable):
            await c.chat("default", say("lost"))
        assert (await c.chat("default", say("back"))).text == "back"
    assert len(daemon.hellos) == 2


async def test_async_oversized_frame_is_refused(daemon: FakeDaemon) -> None:
    async with AsyncClient(daemon.path, max_frame=4096, timeout=5) as c:
        with pytest.raises(ProtocolError, match="above this client's max_frame"):
            await c.chat("default", say("x"), oversize=True)


async def test_async_version_mismatch_is_a_protocol_error(sock_path: str) -> None:
    wrong = Welcome(version=PROTOCOL_VERSION + 1, server="future", max_frame=DEFAULT_MAX_FRAME)
    with FakeDaemon(sock_path, hello_reply=wrong), pytest.raises(ProtocolError, match="version"):
        async with AsyncClient(sock_path):
            pass


async def test_async_missing_socket_is_unavailable_naming_the_path(sock_path: str) -> None:
    with pytest.raises(Unavailable) as caught:
        await AsyncClient(sock_path).chat("default", say("x"))
    assert sock_path in str(caught.value) and "routerd serve" in str(caught.value)


async def test_async_close_fails_pending_requests(daemon: FakeDaemon) -> None:
    c = AsyncClient(daemon.path)
    pending = asyncio.create_task(c.chat("default", say("x"), delay=5))
    await async_wait_for(daemon, lambda: len(daemon.received) == 1)
    await c.aclose()
    with pytest.raises(Unavailable, match="client was closed"):
        await pending
    assert no_reader_tasks()


# ---- errors and paths -------------------------------------------------------------------


def test_errors_survive_pickling() -> None:
    err = error_from_message(
        Error(id=1, kind="rate_limited", message="busy", retry_after=3.0, attempts=ATTEMPTS)
    )
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimited
    assert (copy.message, copy.attempts, copy.retry_after) == ("busy", ATTEMPTS, 3.0)


def test_default_socket_path_precedence(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    system = short_dir / "system.sock"
    monkeypatch.setattr(paths_module, "SYSTEM_SOCKET", str(system))
    monkeypatch.delenv("ROUTERD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert default_socket_path() == f"/tmp/routerd-{os.getuid()}/routerd.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_socket_path() == "/run/user/1234/routerd/routerd.sock"
    system.touch()
    assert default_socket_path() == str(system)
    # The daemon under systemd: its RuntimeDirectory, which clients share as the system socket.
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/routerd")
    assert default_socket_path() == "/run/routerd/routerd.sock"
    monkeypatch.setenv("ROUTERD_SOCKET", "/somewhere/else.sock")
    assert default_socket_path() == "/somewhere/else.sock"
    assert Client().path == "/somewhere/else.sock"


def test_round_trip_latency_is_small(daemon: FakeDaemon) -> None:
    """The client's share of a request must stay far below the 0.3 ms budget's order."""
    with Client(daemon.path) as c:
        for _ in range(50):
            c.chat("default", say("warm"))
        samples = []
        for _ in range(300):
            start = time.perf_counter()
            c.chat("default", say("ping"))
            samples.append(time.perf_counter() - start)
    samples.sort()
    # Loose on purpose (shared CI machines); the fake daemon's own asyncio work is included.
    assert samples[len(samples) // 2] < 0.005

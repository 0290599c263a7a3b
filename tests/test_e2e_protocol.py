"""The wire protocol as the real daemon speaks it, over its real Unix socket.

Malformed input is written by hand on raw sockets: corrupt bytes cost only their own
connection, a schema error costs only its request, an oversized frame is refused before its
body. Then what clients live through: many requests on one connection, cancellation, a client
killed mid-stream, random bytes, and a SIGTERM that drains what is in flight.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import pytest
import routerd_client._shared
import routerd_client.sync
from routerd_client import (
    AsyncClient,
    Client,
    ProtocolError,
    Result,
    StatusReport,
    Unavailable,
    UnknownRoute,
)
from routerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Cancel,
    Chat,
    DaemonMessage,
    Error,
    Hello,
    Welcome,
    daemon_decoder,
    encode_frame,
)

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]

# Never a valid first byte of a msgpack message ("never used" in the spec).
NOT_MSGPACK = b"\xc1" + b"certainly not msgpack"
# msgpack framing around a string that is not UTF-8: {"type": b"\xff\xfe"}.
NOT_UTF8 = b"\x81\xa4type\xa2\xff\xfe"


# ---- set-up ------------------------------------------------------------------------------


def start(mock_provider: MockFactory, daemon: DaemonFactory, server: str = "") -> DaemonProcess:
    """A mock serving m1 and m2 with one key, and a daemon with route "main" = [mock/m1]."""
    key = canary("main")
    mock = mock_provider(
        MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec(), "m2": ModelSpec()})
    )
    config = f"""
[server]
{server}

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
deadline_s = 30
"""
    return daemon(config, env={"KEY_MAIN": key})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def status(path: Path) -> StatusReport:
    with Client(str(path), name="test-status") as client:
        return client.status()


def eventually(
    path: Path, check: Callable[[StatusReport], bool], within: float = 5.0
) -> StatusReport:
    """Poll the daemon's status until ``check`` holds; fail with the last report if never."""
    deadline = time.monotonic() + within
    with Client(str(path), name="test-status") as client:
        while True:
            report = client.status()
            if check(report):
                return report
            if time.monotonic() > deadline:
                raise AssertionError(f"status never got there within {within} s: {report}")
            time.sleep(0.02)


async def eventually_async(
    client: AsyncClient, check: Callable[[StatusReport], bool], within: float = 5.0
) -> StatusReport:
    """``eventually`` for async tests, polling through an AsyncClient."""
    deadline = time.monotonic() + within
    while True:
        report = await client.status()
        if check(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"status never got there within {within} s: {report}")
        await anyio.sleep(0.02)


def idle(report: StatusReport) -> bool:
    return report.in_flight == 0 and all(c.in_flight == 0 for c in report.credentials)


class Raw:
    """A connection that speaks frames by hand, so a test can send what no client would."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            part = self.sock.recv(size - len(data))
            if not part:
                return None
            data += part
        return data

    def recv(self) -> DaemonMessage | None:
        """The next message, or None once the daemon closed the connection."""
        header = self._exactly(HEADER.size)
        if header is None:
            return None
        (size,) = HEADER.unpack(header)
        body = self._exactly(size)
        return None if body is None else daemon_decoder.decode(body)

    def hello(self) -> Welcome:
        self.send(encode_frame(Hello(version=PROTOCOL_VERSION, client="raw")))
        welcome = self.recv()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def closed_by_daemon(self) -> bool:
        """True when the daemon closed its end (reads hit end of stream)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


# ---- malformed input ---------------------------------------------------------------------


def test_corrupt_frame_closes_its_connection_and_nobody_elses(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    with Client(str(routerd.socket_path), name="bystander") as other, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(other.chat, "main", user("bystander [[mock:sleep=500]]"))
        eventually(routerd.socket_path, lambda r: r.in_flight == 1)

        for garbage in (NOT_MSGPACK, NOT_UTF8):
            with Raw(routerd.socket_path) as raw:
                raw.hello()
                raw.send(frame(garbage))
                error = raw.recv()
                assert isinstance(error, Error), error
                assert (error.id, error.kind) == (None, "protocol_error")
                assert raw.closed_by_daemon()

        assert status(routerd.socket_path).in_flight == 1
        result = pending.result(timeout=10)
        assert result.text.endswith("bystander")
        # The bystander's connection is still good for more.
        assert other.chat("main", user("again")).text.endswith("again")
    assert routerd.process.poll() is None
    assert "connection_crashed" not in routerd.log_text()


def test_oversized_frame_is_refused_before_its_body(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    limit = 65536
    routerd = start(mock_provider, daemon, server=f"max_frame = {limit}")
    with Raw(routerd.socket_path) as raw:
        assert raw.hello().max_frame == limit
        started = time.monotonic()
        raw.send(HEADER.pack(limit + 1))  # the header alone: no body byte follows
        error = raw.recv()
        elapsed = time.monotonic() - started
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (None, "protocol_error")
        assert str(limit + 1) in error.message and str(limit) in error.message
        assert elapsed < 2.0  # answered from the header, not after a read timeout
        assert raw.closed_by_daemon()

    # A frame of exactly max_frame bytes is still accepted.
    content = "edge " + "x" * 1000
    chat = Chat(id=1, route="main", request={"messages": user(content), "max_tokens": 8})
    content += "x" * (limit - (len(encode_frame(chat)) - HEADER.size))
    chat.request["messages"] = user(content)
    data = encode_frame(chat)
    assert len(data) - HEADER.size == limit
    with Raw(routerd.socket_path) as raw:
        raw.hello()
        raw.send(data)
        result = raw.recv()
        assert isinstance(result, Result), result
        assert result.id == 1 and "edge xxx" in result.text


def test_hello_with_another_protocol_version_is_refused(
    mock_provider: MockFactory, daemon: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    routerd = start(mock_provider, daemon)
    future = PROTOCOL_VERSION + 1
    with Raw(routerd.socket_path) as raw:
        raw.send(encode_frame(Hello(version=future, client="from-the-future")))
        error = raw.recv()
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (None, "protocol_error")
        assert f"version {future}" in error.message
        assert f"version {PROTOCOL_VERSION}" in error.message
        assert raw.closed_by_daemon()

    # The client says so too: a client speaking another version is refused by the daemon ...
    with monkeypatch.context() as patch:
        patch.setattr(routerd_client.sync, "PROTOCOL_VERSION", future)
        with pytest.raises(ProtocolError, match=f"version {future}"):
            Client(str(routerd.socket_path)).connect()
    # ... and a daemon speaking another version is refused by the client.
    with monkeypatch.context() as patch:
        patch.setattr(routerd_client._shared, "PROTOCOL_VERSION", future)
        with pytest.raises(ProtocolError) as caught:
            Client(str(routerd.socket_path)).connect()
        assert f"version {PROTOCOL_VERSION}" in str(caught.value)
        assert f"speaks {future}" in str(caught.value)

    assert status(routerd.socket_path).in_flight == 0


def test_schema_error_fails_its_request_and_keeps_the_connection(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    with Raw(routerd.socket_path) as raw:
        raw.hello()
        raw.send(frame(msgspec.msgpack.encode({"type": "chat", "id": 5, "route": 7})))
        error = raw.recv()
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (5, "protocol_error")
        assert "route" in error.message

        raw.send(frame(msgspec.msgpack.encode({"type": "launch_missiles", "id": 6})))
        error = raw.recv()
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (6, "protocol_error")

        chat = Chat(id=7, route="main", request={"messages": user("still here")})
        raw.send(encode_frame(chat))
        result = raw.recv()
        assert isinstance(result, Result), result
        assert result.id == 7 and result.text.endswith("still here")


def test_unknown_route_names_the_known_ones_and_provider_model_works(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    with Client(str(routerd.socket_path)) as client:
        with pytest.raises(UnknownRoute) as caught:
            client.chat("no-such-route", user("hi"))
        assert caught.value.kind == "unknown_route"
        assert "no-such-route" in str(caught.value) and "main" in str(caught.value)
        with pytest.raises(UnknownRoute):
            client.chat("nope/m1", user("hi"))

        result = client.chat("mock/m2", user("ad hoc"))
        assert (result.target, result.provider, result.model) == ("mock/m2", "mock", "m2")
        assert result.text == "mock reply from m2 via main: ad hoc"


# ---- many requests, cancellation, vanished clients ----------------------------------------


async def test_many_concurrent_requests_on_one_connection_come_back_to_their_callers(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    count = 50
    finished: list[int] = []
    results: dict[int, Result] = {}
    async with AsyncClient(str(routerd.socket_path)) as client:
        await client.chat("main", user("warm-up"))  # a proven key takes requests in parallel

        async def one(n: int) -> None:
            # Sent first, answered last: replies come back in the opposite order.
            sleep_ms = (count - n) * 6
            results[n] = await client.chat("main", user(f"req {n} [[mock:sleep={sleep_ms}]]"))
            finished.append(n)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(one, n)
        wall = time.monotonic() - started
        report = await client.status()

    assert sorted(results) == list(range(count))
    for n, result in results.items():
        assert result.text == f"mock reply from m1 via main: req {n}"
    assert finished != sorted(finished)  # they really overlapped
    assert wall < 0.5 * sum((count - n) * 0.006 for n in range(count))
    assert report.connections == 1  # all of it went over the one connection


async def test_cancelling_a_request_frees_it_at_once(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    path = str(routerd.socket_path)
    async with AsyncClient(path) as client, AsyncClient(path, name="watch") as watch:
        await client.chat("main", user("warm-up"))

        # A chat whose task is cancelled.
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.chat("main", user("slow [[mock:sleep=5000]]")))
            await eventually_async(watch, lambda r: r.in_flight == 1)
            started = time.monotonic()
            tg.cancel_scope.cancel()
        await eventually_async(watch, idle)
        assert time.monotonic() - started < 1.0

        # A stream left before its first chunk.
        async with client.stream("main", user("slow stream [[mock:sleep=5000]]")) as stream:
            await eventually_async(watch, lambda r: r.in_flight == 1)
            started = time.monotonic()
        assert stream.result is None
        await eventually_async(watch, idle)
        assert time.monotonic() - started < 1.0

        # The connection that cancelled is as good as new.
        result = await client.chat("main", user("after"))
        assert result.text.endswith("after")


def test_cancel_frame_answers_cancelled_and_stops_the_upstream_call(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    key = canary("main")
    mock = mock_provider(MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec()}))
    config = f"""
[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
"""
    routerd = daemon(config, env={"KEY_MAIN": key})
    with Raw(routerd.socket_path) as raw:
        raw.hello()
        raw.send(encode_frame(Chat(id=41, route="main", request={"messages": user("warm")})))
        assert isinstance(raw.recv(), Result)
        mock.reset()

        raw.send(
            encode_frame(
                Chat(id=42, route="main", request={"messages": user("[[mock:sleep=1500]]")})
            )
        )
        eventually(routerd.socket_path, lambda r: r.in_flight == 1)
        started = time.monotonic()
        raw.send(encode_frame(Cancel(id=42)))
        error = raw.recv()
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (42, "cancelled")
        assert time.monotonic() - started < 1.0
        assert idle(status(routerd.socket_path))

        # Had the upstream call lived on, the mock would count its reply after 1.5 s.
        time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
        assert mock.stats()["calls"].get("main", {}).get("m1", {}).get("200") is None

        # A Cancel for a request that is over (or never was) is harmless.
        raw.send(encode_frame(Cancel(id=42)) + encode_frame(Cancel(id=999)))
        raw.send(encode_frame(Chat(id=43, route="main", request={"messages": user("next")})))
        result = raw.recv()
        assert isinstance(result, Result) and result.id == 43


STREAMING_CLIENT = textwrap.dedent(
    """
    import sys
    from routerd_client import Client

    with Client(sys.argv[1], name="doomed") as client:
        for chunk in client.stream("main", [{"role": "user", "content": sys.argv[2]}]):
            print(chunk.text, flush=True)
    """
)


def test_client_killed_mid_stream_frees_its_request(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    path = routerd.socket_path
    with Client(str(path), name="bystander") as other, ThreadPoolExecutor(1) as pool:
        other.chat("main", user("warm-up"))
        child = subprocess.Popen(
            [sys.executable, "-c", STREAMING_CLIENT, str(path), "doomed [[mock:sleep=5000]]"],
            stdout=subprocess.DEVNULL,
        )
        try:
            eventually(path, lambda r: r.in_flight == 1, within=15)
            pending = pool.submit(other.chat, "main", user("bystander [[mock:sleep=800]]"))
            eventually(path, lambda r: r.in_flight == 2)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        # Only the bystander is left in flight; the killed client's connection is gone.
        eventually(path, lambda r: r.in_flight == 1 and r.connections == 2)
        assert pending.result(timeout=10).text.endswith("bystander")
        report = eventually(path, idle)
        assert report.credentials[0].failures == 0  # a client leaving says nothing about a key
        assert other.chat("main", user("after")).text.endswith("after")


def random_inputs(rng: random.Random, count: int) -> Iterator[bytes]:
    """Byte strings from pure noise to nearly valid frames, after a Hello or without one."""
    hello = encode_frame(Hello(version=PROTOCOL_VERSION, client="fuzz"))
    for n in range(count):
        noise = rng.randbytes(rng.randrange(0, 300))
        kind = n % 6
        if kind == 0:
            yield noise
        elif kind == 1:
            yield frame(noise)
        elif kind == 2:  # a header that promises more than follows
            yield HEADER.pack(len(noise) + rng.randrange(1, 1000)) + noise
        elif kind == 3:
            yield hello + frame(noise)
        elif kind == 4:  # well-formed msgpack that is no message of ours
            value = {
                "type": rng.choice(["chat", "cancel", "status", "hello", "x", 3]),
                "id": rng.choice([None, -1, 2**40, "7", rng.randrange(100)]),
                rng.choice(["route", "request", "version"]): rng.choice([None, [], {}, 1.5]),
            }
            yield hello + frame(msgspec.msgpack.encode(value)) + noise[:10]
        else:
            yield hello + HEADER.pack(rng.randrange(2**32)) + noise


def test_random_bytes_never_hurt_the_daemon(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    rng = random.Random(20240611)
    for data in random_inputs(rng, 200):
        with Raw(routerd.socket_path) as raw:
            try:
                raw.send(data)
                raw.sock.shutdown(socket.SHUT_WR)
                # Whatever the daemon answers, it must end the connection.
                while raw.recv() is not None:
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # it hung up before reading everything: fine
            except msgspec.DecodeError as exc:
                raise AssertionError(f"the daemon sent a corrupt frame for {data!r}") from exc

    assert routerd.process.poll() is None
    report = eventually(routerd.socket_path, lambda r: r.connections == 1)
    assert idle(report)
    with Client(str(routerd.socket_path)) as client:
        assert client.chat("main", user("unhurt")).text.endswith("unhurt")
    log = routerd.log_text()
    assert "connection_crashed" not in log, log


# ---- shutdown ----------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    path = str(routerd.socket_path)
    results: list[Result] = []
    async with AsyncClient(path) as client:
        await client.chat("main", user("warm-up"))

        async def slow() -> None:
            results.append(await client.chat("main", user("drained [[mock:sleep=1500]]")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            async with AsyncClient(path, name="watch") as watch:
                await eventually_async(watch, lambda r: r.in_flight == 1)
            routerd.process.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(routerd.wait_for, "STOPPING=1", 5.0)

            with pytest.raises(Unavailable):  # on the open connection: "shutting down"
                await client.chat("main", user("too late"))
            with pytest.raises(Unavailable):  # a new connection: nobody listens any more
                async with AsyncClient(path, timeout=2) as late:
                    await late.chat("main", user("too late"))
            assert not await anyio.Path(path).exists()

    assert [r.text for r in results] == ["mock reply from m1 via main: drained"]
    code = await anyio.to_thread.run_sync(routerd.process.wait, 10.0)
    assert code == 0
    routerd.stop()  # collects the last notifications
    assert "READY=1" in routerd.notifications and "STOPPING=1" in routerd.notifications
    assert routerd.notifications.index("READY=1") < routerd.notifications.index("STOPPING=1")

"""Hostile and unlucky clients against the real daemon over its real Unix socket.

One bad request costs only itself; a frame left half-sent is cut off; stalled large frames
hold no more memory than the buffer budget; a flood of connections meets the connection cap
or the file-descriptor limit without the daemon dying; and requests cut off by the shutdown
are told so.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from routerd_client import (
    AsyncClient,
    BadRequest,
    Client,
    Result,
    RouterdError,
    Unavailable,
)
from routerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    Chat,
    Error,
    Hello,
    Welcome,
    encode_frame,
)

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary
from tests.test_e2e_protocol import MockFactory, Raw, eventually_async, user

MiB = 1024 * 1024
HELLO = encode_frame(Hello(version=PROTOCOL_VERSION, client="hostile"))


def start(mock_provider: MockFactory, daemon: DaemonFactory, server: str = "") -> DaemonProcess:
    """A daemon with route "main" = [mock/m1]; m1 has a context window, as real models do."""
    key = canary("main")
    mock = mock_provider(MockSpec(keys={key: KeySpec("main")}, models={"m1": ModelSpec()}))
    config = f"""
[server]
{server}

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[models."mock/m1"]
context_window = 8000

[routes.main]
chain = ["mock/m1"]
deadline_s = 30
"""
    return daemon(config, env={"KEY_MAIN": key})


def rss_mib(pid: int) -> float:
    """The resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def chat_frame(request_id: int, content: bytes) -> bytes:
    """A Chat frame built by hand around msgpack ``content``, which no client could encode."""
    pack = msgspec.msgpack.encode
    body = (
        b"\x84"
        + pack("type")
        + pack("chat")
        + pack("id")
        + pack(request_id)
        + pack("route")
        + pack("main")
        + pack("request")
        + b"\x81"
        + pack("messages")
        + b"\x91\x82"
        + pack("role")
        + pack("user")
        + pack("content")
        + content
    )
    return HEADER.pack(len(body)) + body


def nested(depth: int) -> bytes:
    """A string inside ``depth`` one-element lists, as msgpack."""
    return b"\x91" * depth + msgspec.msgpack.encode("deep")


def no_tracebacks(routerd: DaemonProcess) -> None:
    log = routerd.log_text()
    assert "Traceback" not in log and "connection_crashed" not in log, log


# ---- one bad request costs only itself ---------------------------------------------------


async def test_an_absurd_integer_fails_only_its_own_request(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    outcomes: dict[int, str | RouterdError] = {}
    async with AsyncClient(str(routerd.socket_path)) as client:
        await client.chat("main", user("warm-up"))

        async def one(n: int) -> None:
            try:
                if n == 2:
                    await client.chat("main", user("huge"), max_tokens=2**64 - 1)
                else:
                    result = await client.chat("main", user(f"req {n} [[mock:sleep=400]]"))
                    outcomes[n] = result.text
            except RouterdError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(one, n)
        # The same connection serves on.
        assert (await client.chat("main", user("after"))).text.endswith("after")

    bad = outcomes.pop(2)
    assert isinstance(bad, BadRequest) and bad.kind == "bad_request", bad
    assert "max_tokens" in str(bad) and str(2**64 - 1) in str(bad)
    assert outcomes == {n: f"mock reply from m1 via main: req {n}" for n in (0, 1, 3, 4)}
    no_tracebacks(routerd)


async def test_deep_nesting_fails_only_its_own_request(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    with Raw(routerd.socket_path, timeout=10) as raw:
        raw.hello()
        slow = Chat(id=1, route="main", request={"messages": user("slow [[mock:sleep=500]]")})
        raw.send(encode_frame(slow))
        raw.send(chat_frame(2, nested(1000)))  # past what msgspec decodes
        raw.send(chat_frame(3, nested(100)))  # decodable, but past the bound
        replies = {}
        for _ in range(3):
            reply = raw.recv()
            assert reply is not None, "the daemon closed the connection"
            assert isinstance(reply, Result | Error), reply
            replies[reply.id] = reply
        for request_id in (2, 3):
            error = replies[request_id]
            assert isinstance(error, Error), error
            assert error.kind == "bad_request" and "nested deeper than 64" in error.message
        result = replies[1]
        assert isinstance(result, Result) and result.text.endswith("slow")
        raw.send(encode_frame(Chat(id=4, route="main", request={"messages": user("still")})))
        after = raw.recv()
        assert isinstance(after, Result) and after.id == 4, after

    async with AsyncClient(str(routerd.socket_path)) as client:
        content: object = "deep"
        for _ in range(100):
            content = [content]
        with pytest.raises(BadRequest, match="nested deeper than 64"):
            await client.chat("main", [{"role": "user", "content": content}])
        for _ in range(900):
            content = [content]
        with pytest.raises(BadRequest, match="cannot be sent"):  # too deep to even encode
            await client.chat("main", [{"role": "user", "content": content}])
        assert (await client.chat("main", user("fine"))).text.endswith("fine")
    no_tracebacks(routerd)


# ---- half-sent frames and memory ---------------------------------------------------------


def test_a_half_sent_frame_is_cut_off_after_read_timeout_s(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon, server="read_timeout_s = 1")
    with Raw(routerd.socket_path, timeout=20) as raw, Client(str(routerd.socket_path)) as other:
        raw.hello()
        started = time.monotonic()
        raw.send(HEADER.pack(1000) + b"\xa5hello")
        error = raw.recv()
        elapsed = time.monotonic() - started
        assert isinstance(error, Error), error
        assert (error.id, error.kind) == (None, "protocol_error")
        assert "frame not completed within 1 s" in error.message
        assert 0.8 < elapsed < 10
        assert raw.closed_by_daemon()
        assert other.chat("main", user("unhurt")).text.endswith("unhurt")


def test_stalled_large_frames_hold_no_more_than_the_buffer_budget(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    frame_size, budget, stalled = 4 * MiB, 8 * MiB, 16
    routerd = start(
        mock_provider,
        daemon,
        server=f"max_frame = {frame_size}\nbuffer_budget = {budget}\nread_timeout_s = 3",
    )
    pid = routerd.process.pid
    with contextlib.ExitStack() as stack:
        bystander = stack.enter_context(Client(str(routerd.socket_path), timeout=10))
        bystander.chat("main", user("warm-up"))
        before = rss_mib(pid)
        socks = []
        for _ in range(stalled):
            raw = stack.enter_context(Raw(routerd.socket_path, timeout=20))
            raw.hello()
            raw.sock.setblocking(False)
            socks.append(raw)
        # Every frame announces frame_size bytes and stops one byte short.
        data = memoryview(HEADER.pack(frame_size) + b"\xc0" * (frame_size - 1))
        sent = [0] * stalled
        pushing_until = time.monotonic() + 3.0
        while time.monotonic() < pushing_until and not all(s == len(data) for s in sent):
            for n, raw in enumerate(socks):
                with contextlib.suppress(BlockingIOError):
                    sent[n] += raw.sock.send(data[sent[n] : sent[n] + MiB])
        peak = 0.0
        for _ in range(5):
            peak = max(peak, rss_mib(pid))
            time.sleep(0.1)
        # While the budget is held, ordinary small requests still go through.
        started = time.monotonic()
        assert bystander.chat("main", user("meanwhile")).text.endswith("meanwhile")
        assert time.monotonic() - started < 2.0
        reasons = []
        for raw in socks:
            raw.sock.settimeout(20)
            error = raw.recv()
            assert isinstance(error, Error) and error.id is None, error
            reasons.append(error.message)
    growth = peak - before
    # Unbounded, the daemon would hold stalled * frame_size = 64 MiB here.
    assert growth < budget / MiB + 12, f"RSS grew by {growth:.1f} MiB"
    assert any("buffer budget" in reason for reason in reasons), reasons
    assert any("frame not completed within 3 s" in reason for reason in reasons), reasons
    assert routerd.process.poll() is None
    with Client(str(routerd.socket_path)) as client:
        assert client.chat("main", user("after")).text.endswith("after")


# ---- connection floods -------------------------------------------------------------------


def first_reply(raw: Raw) -> Welcome | Error | None:
    """What the daemon answers a Hello with; None when it closed without a word."""
    try:
        raw.send(HELLO)
        reply = raw.recv()
    except (ConnectionResetError, BrokenPipeError):
        return None
    assert reply is None or isinstance(reply, Welcome | Error), reply
    return reply


def serves_again(path: Path, within: float = 15.0) -> Result:
    """A normal client's chat, retried until the daemon takes new clients again."""
    deadline = time.monotonic() + within
    while True:
        try:
            with Client(str(path), timeout=5) as client:
                return client.chat("main", user("after the flood"))
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_connections_past_max_connections_are_told_why(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    cap = 20
    routerd = start(mock_provider, daemon, server=f"max_connections = {cap}")
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(Raw(routerd.socket_path, timeout=10)) for _ in range(cap)]
        assert all(isinstance(first_reply(raw), Welcome) for raw in held)
        for _ in range(5):
            with Raw(routerd.socket_path, timeout=10) as extra:
                error = first_reply(extra)
                assert isinstance(error, Error), error
                assert (error.id, error.kind, error.retry_after) == (None, "unavailable", 1.0)
                assert f"too many connections open (server.max_connections = {cap})" in (
                    error.message
                )
                assert extra.closed_by_daemon()
        with pytest.raises(Unavailable, match="too many connections"):
            Client(str(routerd.socket_path), timeout=10).connect()
    assert serves_again(routerd.socket_path).text.endswith("after the flood")
    assert routerd.process.poll() is None


@contextlib.contextmanager
def daemons_limited_to(fds: int) -> Iterator[None]:
    """Start `routerd serve` with RLIMIT_NOFILE at ``fds`` (soft and hard: it cannot lift it)."""
    popen = subprocess.Popen

    def limited(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if "serve" in args:
            kwargs["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))
        return popen(args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", limited)
        yield


def test_a_low_fd_limit_lowers_the_cap_and_the_excess_is_refused_cleanly(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    with daemons_limited_to(256):
        routerd = start(mock_provider, daemon)
    limits = Path(f"/proc/{routerd.process.pid}/limits").read_text().splitlines()
    assert [line.split()[3:5] for line in limits if line.startswith("Max open files")] == [
        ["256", "256"]
    ]
    flood = 300  # more connections than the daemon has descriptors
    with contextlib.ExitStack() as stack:
        replies = []
        for _ in range(flood):
            raw = stack.enter_context(Raw(routerd.socket_path, timeout=10))
            replies.append(first_reply(raw))
        welcomed = sum(isinstance(r, Welcome) for r in replies)
        refused = [r for r in replies if isinstance(r, Error)]
        assert 10 <= welcomed < 256 - 64, welcomed
        # Every connection past the cap heard why; none was dropped without a word.
        assert len(refused) == flood - welcomed
        assert all(
            r.kind == "unavailable" and "too many connections" in r.message for r in refused
        ), refused[:3]
        assert routerd.process.poll() is None
    assert serves_again(routerd.socket_path).text.endswith("after the flood")
    log = routerd.log_text()
    assert "accept_failed" not in log  # the cap kept the daemon inside its descriptors
    assert log.count("connections_over_cap") <= 2, log  # one line per 10 s, with a count
    no_tracebacks(routerd)


def test_running_out_of_file_descriptors_does_not_stop_the_daemon(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon)
    pid = routerd.process.pid
    # Lowered after start, so the daemon's connection cap (from its limit at start) is far
    # above what it can open: accept() itself runs out of descriptors.
    resource.prlimit(
        pid, resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    with contextlib.ExitStack() as stack:
        for _ in range(300):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.settimeout(10)
            sock.connect(str(routerd.socket_path))
        deadline = time.monotonic() + 10
        while "EMFILE" not in routerd.log_text():
            assert time.monotonic() < deadline, routerd.log_text()
            time.sleep(0.1)
        time.sleep(1.5)  # several rounds of back-off
        assert routerd.process.poll() is None, routerd.log_text()
    assert serves_again(routerd.socket_path).text.endswith("after the flood")
    assert routerd.process.poll() is None
    log = routerd.log_text()
    assert log.count("accept_failed") <= 2, log  # one line per 10 s, with a count
    assert errno.errorcode[errno.EMFILE] in log
    no_tracebacks(routerd)


# ---- shutdown ----------------------------------------------------------------------------


async def test_requests_cut_off_by_the_drain_timeout_are_told_so(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    routerd = start(mock_provider, daemon, server="drain_timeout_s = 1")
    path = str(routerd.socket_path)
    errors: list[RouterdError] = []
    async with AsyncClient(path) as client, AsyncClient(path, name="watch") as watch:
        await client.chat("main", user("warm-up"))

        async def chat() -> None:
            try:
                await client.chat("main", user("slow [[mock:sleep=20000]]"))
            except RouterdError as exc:
                errors.append(exc)

        async def stream() -> None:
            try:
                async for _ in client.stream("main", user("slow stream [[mock:sleep=20000]]")):
                    pass
            except RouterdError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)
            tg.start_soon(stream)
            await eventually_async(watch, lambda r: r.in_flight == 2)
            started = time.monotonic()
            routerd.process.send_signal(signal.SIGTERM)
        elapsed = time.monotonic() - started

    assert len(errors) == 2, errors
    for error in errors:
        assert isinstance(error, Unavailable), error
        assert error.message == "routerd is shutting down; the request was not finished"
        assert error.retry_after == 1.0
    assert elapsed < 10
    code = await anyio.to_thread.run_sync(routerd.process.wait, 10.0)
    assert code == 0

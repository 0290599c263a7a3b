"""The HTTP front of the real daemon against hostile and broken clients.

What an operator notices: a flood of idle connections past the cap (or past the process's
file-descriptor limit) neither fills the log nor takes the daemon down, and it serves again
as soon as the flood ends; a client that sends half a request head, half a body, or
nothing at all after its last reply is hung up on; request bodies that stall hold no more
memory than the buffer budget allows, and give it all back when they end.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest

from routerd.core.calls import Reply
from routerd.dispatch.dispatcher import Dispatcher
from routerd.fronts.budget import BudgetExhausted, BufferBudget
from routerd.fronts.http import FrontApp, FrontState, Metrics
from routerd.fronts.http.body import BodyTooLarge, read_body
from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process
from tests.conftest import DaemonFactory, canary
from tests.test_http_front import http_addresses

MockFactory = Callable[[MockSpec], MockProcess]

KEY = canary("main")

CONFIG = """
[server]
http_socket = "{http}"
{server}

[providers.mock]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m1"]
"""

CHAT = {"model": "main", "messages": [{"role": "user", "content": "still there?"}]}


def start(
    daemon: DaemonFactory, mock_provider: MockFactory, short_dir: Path, server: str
) -> tuple[DaemonProcess, Path]:
    """A mock provider and a daemon whose HTTP front listens on short_dir/http.sock."""
    mock = mock_provider(MockSpec(keys={KEY: KeySpec("main")}, models={"m1": ModelSpec()}))
    http = short_dir / "http.sock"
    config = CONFIG.format(http=http, server=server, base_url=mock.base_url)
    return daemon(config, env={"KEY_MAIN": KEY}), http


def uds_client(path: Path, **kwargs: Any) -> httpx.Client:
    """A plain HTTP client over the front's Unix socket."""
    transport = httpx.HTTPTransport(uds=str(path))
    return httpx.Client(transport=transport, base_url="http://routerd", **kwargs)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    """The process's resident set size in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the daemon sends until it hangs up, and how long that took (None: it
    did not hang up within ``timeout``)."""
    started = time.monotonic()
    data = b""
    while (left := timeout - (time.monotonic() - started)) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


def served(path: Path, within: float) -> httpx.Response:
    """A chat request that succeeds, retried until ``within`` s have passed."""
    deadline = time.monotonic() + within
    while True:
        try:
            with uds_client(path, timeout=10) as http:
                reply = http.post("/v1/chat/completions", json=CHAT)
            if reply.status_code == 200:
                return reply
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the daemon did not serve again"
        time.sleep(0.2)


def settle(pid: int, seconds: float) -> int:
    """The daemon's open descriptors once the count has stopped moving (or ``seconds``)."""
    deadline = time.monotonic() + seconds
    last = open_fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = open_fds(pid)
        if now == last:
            return now
        last = now
    return last


# ---- floods of connections ---------------------------------------------------------------


def test_idle_flood_past_the_cap_is_refused_and_the_daemon_serves_after_it(
    daemon: DaemonFactory, mock_provider: MockFactory, short_dir: Path
) -> None:
    process, http = start(
        daemon, mock_provider, short_dir, "max_connections = 40\nread_timeout_s = 30"
    )
    pid = process.process.pid
    served(http, 10)
    base = settle(pid, 3)
    flood: list[socket.socket] = []
    try:
        for _ in range(200):
            flood.append(connect(http))
        held = settle(pid, 5)
        # Each open connection is one descriptor: the cap bounds them, not the flood.
        assert held <= base + 40 + 5, (base, held)
        # The ones past the cap were told so at once and hung up on.
        refused = 0
        for sock in flood:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                data = sock.recv(4096)
                refused += 1
                assert data == b"" or data.startswith(b"HTTP/1.1 503 "), data
        assert refused >= 150
        assert process.process.poll() is None
    finally:
        for sock in flood:
            sock.close()
    reply = served(http, 10)
    assert reply.json()["choices"][0]["message"]["content"].endswith("still there?")
    refusals = process.log_text().count("http_connection_refused")
    assert 1 <= refusals <= 2, process.log_text()[-3000:]


def test_running_out_of_descriptors_neither_floods_the_log_nor_stops_the_daemon(
    daemon: DaemonFactory, mock_provider: MockFactory, short_dir: Path
) -> None:
    process, http = start(daemon, mock_provider, short_dir, "read_timeout_s = 30")
    pid = process.process.pid
    served(http, 10)
    # The cap stays at its default of 1000, far above what this limit leaves: accept()
    # itself fails with EMFILE, as it does when the cap was set too high for the machine.
    soft = settle(pid, 3) + 30
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    flood: list[socket.socket] = []
    try:
        for _ in range(150):
            flood.append(connect(http))  # past the limit they wait in the listen backlog
        # asyncio retries a failed accept() once a second and reports every failure.
        time.sleep(5)
        assert process.process.poll() is None
        assert open_fds(pid) <= soft
    finally:
        for sock in flood:
            sock.close()
    served(http, 15)
    log = process.log_text()
    # One line says it (with how many more it held back), not one per failed accept().
    failures = [line for line in log.splitlines() if '"http_accept_failed"' in line]
    assert 1 <= len(failures) <= 2, log[-3000:]
    assert "Too many open files" in failures[0]
    assert "Traceback" not in log
    assert len(log.splitlines()) < 40, log[-3000:]


# ---- clients that stop half way ----------------------------------------------------------


@pytest.fixture(scope="module")
def slow_front() -> Iterator[tuple[DaemonProcess, Path, str]]:
    """A daemon with 1 s read and keep-alive timeouts, on a Unix socket and on TCP."""
    directory = Path(tempfile.mkdtemp(prefix="rd-hostile-", dir="/tmp"))
    mock = start_mock_process(MockSpec(keys={KEY: KeySpec("main")}, models={"m1": ModelSpec()}))
    try:
        http = directory / "http.sock"
        server = 'http_listen = "127.0.0.1:0"\nread_timeout_s = 1\nhttp_keepalive_s = 1'
        config = directory / "routerd.toml"
        config.write_text(CONFIG.format(http=http, server=server, base_url=mock.base_url))
        env = {"KEY_MAIN": KEY, "ROUTERD_HTTP_TOKEN": "tok", "XDG_STATE_HOME": str(directory)}
        with DaemonProcess(
            config, socket_path=directory / "d.sock", env=env, log_path=directory / "d.log"
        ) as process:
            tcp = next(a for a in http_addresses(process) if not a.startswith("/"))
            yield process, http, tcp
    finally:
        mock.close()
        shutil.rmtree(directory, ignore_errors=True)


def tcp_connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)))


def test_a_half_sent_head_is_hung_up_on_after_the_read_timeout(
    slow_front: tuple[DaemonProcess, Path, str],
) -> None:
    _, http, tcp = slow_front
    openers: list[Callable[[], socket.socket]] = [lambda: connect(http), lambda: tcp_connect(tcp)]
    for opener in openers:
        with opener() as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: routerd\r\ncontent-")
            data, took = read_until_closed(sock, 15)
            assert took is not None, "a half-sent head kept its connection"
            assert 0.5 < took < 8
            assert data.startswith(b"HTTP/1.1 408 "), data


def test_a_connection_that_never_sends_is_hung_up_on(
    slow_front: tuple[DaemonProcess, Path, str],
) -> None:
    _, http, _ = slow_front
    with connect(http) as sock:
        data, took = read_until_closed(sock, 15)
        assert took is not None and 0.5 < took < 8
        assert data == b""


def test_an_idle_keep_alive_is_closed_after_http_keepalive_s(
    slow_front: tuple[DaemonProcess, Path, str],
) -> None:
    _, http, _ = slow_front
    with connect(http) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: routerd\r\n\r\n")
        sock.settimeout(10)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
        # uvicorn's own default would keep it for 5 s.
        _, took = read_until_closed(sock, 15)
        assert took is not None and took < 3.5


def test_a_half_sent_body_gets_a_408_and_is_hung_up_on(
    slow_front: tuple[DaemonProcess, Path, str],
) -> None:
    process, http, _ = slow_front
    with connect(http) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: routerd\r\n"
            b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
            b'{"model": "main", '
        )
        data, took = read_until_closed(sock, 15)
        assert took is not None and 0.5 < took < 8
        assert data.startswith(b"HTTP/1.1 408 "), data
        body = json.loads(data.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "request_timeout"
        assert "read_timeout_s" in body["error"]["message"]
    # The daemon still serves, and whole requests are untouched by the timeouts.
    reply = served(http, 10)
    assert reply.headers["x-routerd-attempts"] == "1"
    assert process.process.poll() is None


# ---- memory ------------------------------------------------------------------------------

BIG = 15_900_000  # just under max_frame's default of 16 MiB
SENT = 15_500_000  # what each stalled client sends of it before it stops


def stall(path: Path, outcome: list[bytes]) -> None:
    """Announce a BIG body, send most of it, then stop; keep what the daemon answers."""
    sock = connect(path)
    try:
        sock.sendall(
            b"POST /v1/messages/count_tokens HTTP/1.1\r\nhost: routerd\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % BIG
        )
        piece = b"x" * 65536
        sent = 0
        with contextlib.suppress(OSError):  # refused ones are hung up on mid-send
            while sent < SENT:
                sock.sendall(piece)
                sent += len(piece)
        data, _ = read_until_closed(sock, 40)
        outcome.append(data)
    finally:
        sock.close()


def count_tokens_body(size: int) -> bytes:
    head = b'{"model": "main", "max_tokens": 5, "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    return head + b"y" * (size - len(head) - len(tail)) + tail


def test_stalled_large_bodies_stay_within_the_buffer_budget(
    daemon: DaemonFactory, mock_provider: MockFactory, short_dir: Path
) -> None:
    budget = 48 * 1024 * 1024
    process, http = start(
        daemon, mock_provider, short_dir, f"buffer_budget = {budget}\nread_timeout_s = 4"
    )
    pid = process.process.pid
    served(http, 10)
    outcomes: list[bytes] = []
    threads = [threading.Thread(target=stall, args=(http, outcomes)) for _ in range(20)]
    for thread in threads:
        thread.start()
    peak = 0.0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert process.process.poll() is None
    assert peak < 150, f"peak RSS {peak:.0f} MB"
    statuses = sorted(data[:12] for data in outcomes)
    assert len(statuses) == 20
    # Admitted bodies time out (408); the rest found the budget full (Anthropic's 529
    # "overloaded", as count_tokens is its endpoint) or were cut off mid-send.
    assert {s for s in statuses if s} <= {b"HTTP/1.1 408", b"HTTP/1.1 529"}, statuses
    assert b"HTTP/1.1 408" in statuses
    with uds_client(http, timeout=30) as client:
        health = client.get("/healthz").json()
        assert health["buffer_budget"] == {"used": 0, "limit": budget}
    # All of it is back: three bodies that together need nearly the whole budget fit at once.
    results: list[int] = []

    def count() -> None:
        with uds_client(http, timeout=30) as client:
            results.append(
                client.post("/v1/messages/count_tokens", content=count_tokens_body(BIG)).status_code
            )

    counters = [threading.Thread(target=count) for _ in range(3)]
    for thread in counters:
        thread.start()
    for thread in counters:
        thread.join()
    assert results == [200, 200, 200]
    assert rss_mb(pid) < 150


def test_a_body_larger_than_max_frame_is_refused_before_it_is_read(
    slow_front: tuple[DaemonProcess, Path, str],
) -> None:
    _, http, _ = slow_front
    with connect(http) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: routerd\r\n"
            b"content-type: application/json\r\ncontent-length: 999999999\r\n\r\n"
        )
        data, took = read_until_closed(sock, 15)
        assert took is not None and took < 3, "the daemon waited for a body it refuses"
        assert data.startswith(b"HTTP/1.1 413 ")
        assert b"connection: close" in data.lower()


# ---- who is asking -----------------------------------------------------------------------


class _Recorder:
    """Stands in for the dispatcher: remembers the fairness key of each chat."""

    in_flight = 0

    def __init__(self) -> None:
        self.targets: dict[str, object] = {}
        self.routes: dict[str, object] = {}
        self.clients: list[str] = []

    async def chat(self, route: str, request: dict[str, Any], **kwargs: Any) -> Reply:
        self.clients.append(kwargs["client"])
        raise RuntimeError("recorded")


@pytest.mark.parametrize(
    ("scope_extra", "expected"),
    [
        ({"routerd.client": "pid:4242", "client": None}, "pid:4242"),
        ({"client": ("127.0.0.1", 50123)}, "tcp:127.0.0.1:50123"),
    ],
)
async def test_each_chat_names_its_sender_for_fairness(
    scope_extra: dict[str, Any], expected: str
) -> None:
    recorder = _Recorder()
    state = FrontState(
        cast(Dispatcher, recorder),
        Metrics(lambda: cast(Any, None)),
        lambda: False,
        1 << 20,
        budget=BufferBudget(1 << 21),
    )
    app = FrontApp(state, token=None)
    body = json.dumps(CHAT).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[MutableMapping[str, Any]] = []
    gone = anyio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await app({**scope, **scope_extra}, receive, send)
    assert recorder.clients == [expected]
    assert sent[0]["status"] == 500
    assert state.budget.used == 0


async def test_a_chunked_body_reserves_as_it_arrives_and_gives_all_back() -> None:
    budget = BufferBudget(1 << 20)
    seen: list[int] = []
    chunks = [b"a" * 100_000] * 3

    async def receive() -> dict[str, Any]:
        seen.append(budget.used)
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": True}
        return {"type": "http.disconnect"}

    assert await read_body(receive, None, limit=1 << 20, budget=budget, timeout_s=5) is None
    assert seen == [0, 100_000, 200_000, 300_000]
    assert budget.used == 0
    # A declared length is reserved whole; past what is free, the reader waits, then gives up.
    budget.try_reserve(900_000)
    with pytest.raises(BudgetExhausted):
        await read_body(receive, "200000", limit=1 << 20, budget=budget, timeout_s=0.2)
    assert budget.used == 900_000


async def test_a_body_all_arrived_is_taken_without_a_reservation_but_held_to_the_limit() -> None:
    budget = BufferBudget(1000)
    budget.try_reserve(1000)  # full: a body still arriving would have to wait for room

    async def receive() -> dict[str, Any]:
        raise AssertionError("a whole body is not read again")

    body = await read_body(
        receive, "5", limit=100, budget=budget, timeout_s=5, whole=lambda: b"hello"
    )
    assert body == b"hello"
    # Chunked (no length declared) and whole: still held to the limit.
    with pytest.raises(BodyTooLarge):
        await read_body(
            receive, None, limit=100, budget=budget, timeout_s=5, whole=lambda: b"x" * 101
        )
    assert budget.used == 1000

"""Happy Eyeballs (routerd.upstream.eyeballs): a host's addresses raced, staggered, with
every loser closed; and the upstream pool reaching a host whose first address never answers
(a listener whose accept queue is full drops the SYN, as a broken IPv6 route does)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from routerd.upstream.eyeballs import Address, first_connected, interleaved, resolve
from routerd.upstream.proxy import proxies_from
from routerd.upstream.session import UpstreamSession
from routerd.upstream.wire import ConnectError, ConnectTimeout
from tests.loopback import wait_until
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend
from tests.test_upstream_client import Server, answer, fetch
from tests.test_upstream_proxy import NAME, tls_behind_proxy

V4, V6 = socket.AF_INET, socket.AF_INET6


def test_the_families_alternate_the_first_one_first() -> None:
    found = [(V6, "a", 1), (V6, "b", 1), (V6, "a", 1), (V4, "c", 1), (V4, "d", 1), (V4, "e", 1)]
    assert interleaved(found) == [("a", 1), ("c", 1), ("b", 1), ("d", 1), ("e", 1)]


async def test_an_address_resolves_to_itself_and_a_name_through_the_resolver() -> None:
    assert await resolve("10.1.2.3", 443) == [("10.1.2.3", 443)]
    assert await resolve("::1", 80) == [("::1", 80)]
    found = await resolve("localhost", 8080)
    assert found and all(ipaddress.ip_address(h).is_loopback and p == 8080 for h, p in found)


class Attempts:
    """A connect() whose attempts end when the test says: ``results[address]`` is set to a
    value or an exception; ``closed`` lists the values closed as losers."""

    def __init__(self) -> None:
        self.started: list[Address] = []
        self.results: dict[Address, asyncio.Future[str]] = {}
        self.cancelled: list[Address] = []
        self.closed: list[str] = []

    async def connect(self, address: Address) -> str:
        self.started.append(address)
        future = self.results.setdefault(address, asyncio.get_running_loop().create_future())
        try:
            return await future
        except asyncio.CancelledError:
            self.cancelled.append(address)
            raise

    def close(self, value: str) -> None:
        self.closed.append(value)

    def settle(self, address: Address, outcome: str | Exception) -> None:
        future = self.results.setdefault(address, asyncio.get_running_loop().create_future())
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


A, B, C = ("10.0.0.1", 443), ("10.0.0.2", 443), ("10.0.0.3", 443)


async def test_the_next_address_starts_after_the_delay_and_the_slow_one_is_cancelled() -> None:
    attempts = Attempts()
    started = time.monotonic()
    race = asyncio.create_task(first_connected([A, B], attempts.connect, attempts.close, 0.5))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert attempts.started == [A]  # B waits for the delay
    await wait_until(lambda: attempts.started == [A, B])
    assert time.monotonic() - started >= 0.5
    attempts.settle(B, "conn-b")
    assert await race == "conn-b"
    await wait_until(lambda: attempts.cancelled == [A])
    assert attempts.closed == []


async def test_a_failure_starts_the_next_address_at_once_and_all_failing_names_each() -> None:
    attempts = Attempts()
    started = time.monotonic()
    race = asyncio.create_task(first_connected([A, B, C], attempts.connect, attempts.close, 30))
    for address in (A, B, C):
        await asyncio.sleep(0.01)
        attempts.settle(address, ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(OSError) as caught:
        await race
    assert time.monotonic() - started < 5  # never the 30 s delay
    assert attempts.started == [A, B, C]
    assert str(caught.value) == (
        "10.0.0.1 port 443: [Errno 111] Connection refused; "
        "10.0.0.2 port 443: [Errno 111] Connection refused; "
        "10.0.0.3 port 443: [Errno 111] Connection refused"
    )


async def test_a_loser_that_connects_after_the_winner_is_closed() -> None:
    attempts = Attempts()
    race = asyncio.create_task(first_connected([A, B], attempts.connect, attempts.close, 0.01))
    await wait_until(lambda: attempts.started == [A, B])
    # Both connect in the same turn of the loop: one wins, the other is closed.
    attempts.settle(A, "conn-a")
    attempts.settle(B, "conn-b")
    assert await race == "conn-a"
    await wait_until(lambda: attempts.closed == ["conn-b"])


async def test_no_address_is_an_error() -> None:
    attempts = Attempts()
    with pytest.raises(OSError, match="no address to connect to"):
        await first_connected([], attempts.connect, attempts.close)


async def test_cancelling_the_race_cancels_every_attempt() -> None:
    attempts = Attempts()
    race = asyncio.create_task(first_connected([A, B], attempts.connect, attempts.close, 0.01))
    await wait_until(lambda: attempts.started == [A, B])
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await race
    await wait_until(lambda: sorted(attempts.cancelled) == [A, B])


# --- the pool ---------------------------------------------------------------------------


@pytest.fixture
def unanswering() -> Iterator[socket.socket]:
    """A listener on 127.0.0.2 whose accept queue is full: a SYN to it goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(0)
    filling = []
    for _ in range(2):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the handshake goes on without us
            sock.connect(listener.getsockname())
        filling.append(sock)
    yield listener
    for sock in [*filling, listener]:
        sock.close()


async def test_a_host_whose_first_address_never_answers_is_reached_on_the_next(
    unanswering: socket.socket,
) -> None:
    server = await Server(answer()).start()
    dead = unanswering.getsockname()

    async def resolve(host: str, port: int) -> list[Address]:
        assert (host, port) == ("dual.test", server.port)
        return [dead, ("127.0.0.1", server.port)]

    try:
        async with UpstreamSession(4, resolve=resolve) as session:
            started = time.monotonic()
            url = f"http://dual.test:{server.port}/v1"
            assert await fetch(session, url) == (200, b'{"ok": true}')
            assert time.monotonic() - started < 4.0  # not the 5 s connect timeout
            assert session.pool().open == 1  # the unanswered attempt left nothing open
        assert len(server.peers) == 1

        async def only_dead(host: str, port: int) -> list[Address]:
            return [dead]

        async with UpstreamSession(4, resolve=only_dead) as session:
            with pytest.raises(ConnectTimeout, match=r"took over 0\.3s"):
                await session.request(url, b"", {}, 5.0, connect_s=0.3)
            assert session.pool().open == 0
    finally:
        await server.stop()


async def test_every_address_refusing_is_one_connect_error_naming_each() -> None:
    with socket.socket() as probe:  # two loopback ports nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    async def resolve(host: str, port: int) -> list[Address]:
        return [("127.0.0.2", closed), ("127.0.0.1", closed)]

    async with UpstreamSession(4, resolve=resolve) as session:
        with pytest.raises(ConnectError) as caught:
            await fetch(session, f"http://dual.test:{closed}/v1")
        assert session.pool().open == 0
    message = str(caught.value)
    assert message.startswith(f"cannot connect to dual.test:{closed}: 127.0.0.2 port {closed}")
    assert f"; 127.0.0.1 port {closed}: " in message


async def test_a_proxy_whose_first_address_never_answers_is_reached_on_the_next(
    unanswering: socket.socket, tmp_path: Path
) -> None:
    cert, server, proxy = await tls_behind_proxy(tmp_path)
    dead = unanswering.getsockname()

    async def resolve(host: str, port: int) -> list[Address]:
        assert host == "proxy.test"
        return [dead, ("127.0.0.1", proxy.port)]

    proxies = proxies_from({"HTTPS_PROXY": f"http://proxy.test:{proxy.port}"})
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with UpstreamSession(4, tls=trusting, proxies=proxies, resolve=resolve) as session:
            started = time.monotonic()
            assert await fetch(session, f"https://{NAME}/v1") == (200, b'{"ok": true}')
            assert time.monotonic() - started < 4.0  # not the 5 s connect timeout
            assert session.pool().open == 1
        assert proxy.lines == [f"CONNECT {NAME}:443 HTTP/1.1"]
    finally:
        await proxy.stop()
        await server.stop()

"""The HTTP front's own accept loop, on both event loops: each connection gets a protocol,
TCP connections send small writes at once (no Nagle), and the loop ends when cancelled."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio

from routerd.fronts.http.connections import LOG_INTERVAL_S, Throttle, accept_connections
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend
from tests.test_http_server import loopback_listener


async def test_tcp_connections_are_served_without_nagle() -> None:
    made: list[Any] = []
    three = anyio.Event()

    def protocol() -> asyncio.Protocol:
        class Recorder(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(transport)
                if len(made) == 3:
                    three.set()

        return Recorder()

    listener = loopback_listener()
    port = listener.getsockname()[1]
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept_connections, listener, protocol, Throttle(LOG_INTERVAL_S))
                clients = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
                await three.wait()
                tg.cancel_scope.cancel()
        nodelay = [
            t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for t in made
        ]
        assert nodelay == [1, 1, 1]
    finally:
        for transport in made:
            transport.close()
        for client in clients:
            await client.aclose()
        listener.close()

"""Connecting to a host with several addresses: Happy Eyeballs (RFC 8305).

A provider's name often resolves to IPv6 and IPv4 addresses. Tried one after the other, an
address that never answers (an IPv6 route that is configured but broken) would hold every
new connection for the whole connect timeout, and uvloop's ``create_connection`` has no
``happy_eyeballs_delay``. So the addresses are tried in turn, the families interleaved, each
``ATTEMPT_DELAY_S`` after the last began or as soon as it failed; the first to connect is
used and every other attempt is cancelled, or closed should it connect anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["ATTEMPT_DELAY_S", "Address", "first_connected", "interleaved", "resolve"]

# RFC 8305's recommended delay between two connection attempts.
ATTEMPT_DELAY_S = 0.25

Address = tuple[str, int]  # (IP address, port)
T = TypeVar("T")
Connect = Callable[[Address], Coroutine[Any, Any, T]]


async def resolve(host: str, port: int) -> list[Address]:
    """``host``'s addresses for TCP, families interleaved; an IP address is its own."""
    with contextlib.suppress(ValueError):
        return [(str(ipaddress.ip_address(host)), port)]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return interleaved([(info[0], str(info[4][0]), int(info[4][1])) for info in infos])


def interleaved(found: Sequence[tuple[int, str, int]]) -> list[Address]:
    """(family, host, port) in the resolver's order, rearranged so that the families
    alternate, the first one first; duplicates dropped."""
    by_family: dict[int, list[Address]] = {}
    for family, host, port in found:
        queue = by_family.setdefault(family, [])
        if (host, port) not in queue:
            queue.append((host, port))
    queues = list(by_family.values())
    ordered: list[Address] = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


async def first_connected(
    addresses: Sequence[Address],
    connect: Connect[T],
    close: Callable[[T], None],
    delay: float = ATTEMPT_DELAY_S,
) -> T:
    """The first of ``connect(address)`` to succeed, the attempts staggered by ``delay``;
    ``close`` disposes of any other that succeeds, now or later. Raises the only error, or
    an OSError naming each address's, when every attempt failed."""
    if len(addresses) == 1:
        return await connect(addresses[0])
    if not addresses:
        raise OSError("no address to connect to")
    race = _Race(connect, close)
    try:
        for address in addresses:
            race.start(address)
            if await race.settled(delay):
                return race.winner()
        while race.running():
            if await race.settled(None):
                return race.winner()
    finally:
        race.end()
    raise race.failure()


class _Race(Generic[T]):
    """The attempts of one ``first_connected``: started, settled, and ended."""

    def __init__(self, connect: Connect[T], close: Callable[[T], None]) -> None:
        self._connect = connect
        self._close = close
        self._tasks: dict[asyncio.Task[T], Address] = {}
        self._errors: list[tuple[Address, BaseException]] = []
        self._won: list[T] = []

    def start(self, address: Address) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(address))
        self._tasks[task] = address

    def running(self) -> bool:
        return not all(task.done() for task in self._tasks)

    async def settled(self, patience: float | None) -> bool:
        """Wait up to ``patience`` seconds for an attempt to end; True once one connected."""
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        for task, address in [*self._tasks.items()]:
            if task.done() and not self._won:
                del self._tasks[task]
                exc = asyncio.CancelledError() if task.cancelled() else task.exception()
                if exc is None:
                    self._won.append(task.result())
                else:
                    self._errors.append((address, exc))
        return bool(self._won)

    def winner(self) -> T:
        return self._won[0]

    def end(self) -> None:
        """Cancel the attempts still running; one that connects anyway is closed."""
        for task in self._tasks:
            task.cancel()
            task.add_done_callback(self._dispose)

    def _dispose(self, task: asyncio.Task[T]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._close(task.result())

    def failure(self) -> BaseException:
        if len(self._errors) == 1:
            return self._errors[0][1]
        return OSError(
            "; ".join(f"{host} port {port}: {exc}" for (host, port), exc in self._errors)
        )

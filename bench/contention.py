"""routerd's CPU per request as its client gets busier: the same requests, the same path.

front.py finds routerd spending more CPU per request behind the HTTP front than behind its
msgpack socket when loaded (c16, c64), far more than the two fronts differ by in one
process (request_cpu.py). This separates the front from the load around it: one client
process sends requests over the msgpack socket to a real daemon in front of front.py's
aiohttp responder, and after each reply spends a fixed time on the CPU (a busy loop, no
I/O, standing in for a client such as aiohttp's HTTP client or the OpenAI SDK). Rounds
alternate between the busy times; per busy time and concurrency the script prints the
requests served per second, and per request routerd's CPU (user + system, from /proc),
how often it slept (waited for work: a voluntary context switch) and how often it was
preempted (runnable while another process had its core).

    .venv-bench/bin/python bench/contention.py [--requests N] [--rounds R] [--busy-us 0,40,80,120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from front import Call, cpu_seconds, free_port, msgpack_paths, start_child, start_routerd
from routerd_client import AsyncClient


class Round(NamedTuple):
    """One measurement: requests/s, and per request routerd's CPU (us), sleeps, preemptions."""

    rate: float
    cpu_us: float
    sleeps: float
    preempted: float


def switches(pid: int) -> tuple[int, int]:
    """The voluntary and involuntary context switches of all of ``pid``'s threads so far."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread gone meanwhile
            for line in (task / "status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name == "voluntary_ctxt_switches":
                    voluntary += int(value)
                elif name == "nonvoluntary_ctxt_switches":
                    involuntary += int(value)
    return voluntary, involuntary


async def measure(call: Call, pid: int, busy_us: int, concurrency: int, n: int) -> Round:
    """``n`` requests, ``concurrency`` at a time, each reply followed by ``busy_us`` of CPU."""
    left = n
    busy_s = busy_us / 1e6

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()
            until = time.perf_counter() + busy_s
            while time.perf_counter() < until:
                pass

    cpu_before, switched_before = cpu_seconds({"routerd": pid})["routerd"], switches(pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    used = cpu_seconds({"routerd": pid})["routerd"] - cpu_before
    voluntary, involuntary = (a - b for a, b in zip(switches(pid), switched_before, strict=True))
    return Round(n / seconds, used / n * 1e6, voluntary / n, involuntary / n)


async def run(
    socket_path: Path, pid: int, busy: list[int], concurrencies: list[int], n: int, rounds: int
) -> dict[tuple[int, int], list[Round]]:
    """Per (busy us, concurrency): each round's figures, the rounds alternating."""
    figures: dict[tuple[int, int], list[Round]] = {}
    async with AsyncClient(str(socket_path), name="contention") as client:
        call, _ = msgpack_paths(client)
        for _ in range(200):  # warm up: connections, caches
            await call()
        for _ in range(rounds):
            for busy_us in busy:
                for concurrency in concurrencies:
                    figures.setdefault((busy_us, concurrency), []).append(
                        await measure(call, pid, busy_us, concurrency, n)
                    )
    return figures


def report(figures: dict[tuple[int, int], list[Round]], requests: int, rounds: int) -> None:
    print(
        f"routerd's CPU per request over its msgpack socket, as the client spends more CPU per "
        f"reply ({requests} requests x {rounds} rounds per row, rounds alternating; median of "
        f"the rounds); Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    head = ("client busy us", "concurrency", "req/s", "routerd us/req", "sleeps/req")
    print("  " + "  ".join(f"{name:>14}" for name in (*head, "preempted/req")))
    for (busy_us, concurrency), measured in sorted(figures.items()):
        rate, cpu, sleeps, preempted = map(statistics.median, zip(*measured, strict=True))
        row = (f"{busy_us}", f"{concurrency}", f"{rate:.0f}", f"{cpu:.1f}", f"{sleeps:.2f}")
        print("  " + "  ".join(f"{cell:>14}" for cell in (*row, f"{preempted:.2f}")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--busy-us", default="0,40,80,120", help="the client's CPU time per reply, comma-separated"
    )
    args = parser.parse_args()
    busy = [int(part) for part in args.busy_us.split(",")]
    responder, port = start_child("responder", "--responder", "--chunks", "20")
    try:
        with tempfile.TemporaryDirectory(prefix="routerd-contention-") as tmp:
            workdir = Path(tmp)
            upstream = f"http://127.0.0.1:{port}/v1"
            daemon = start_routerd(workdir, upstream, free_port(), "contention-token", "info")
            with daemon:
                pid = daemon.process.pid
                figures = asyncio.run(
                    run(workdir / "routerd.sock", pid, busy, [16, 64], args.requests, args.rounds)
                )
    finally:
        responder.stop()
    report(figures, args.requests, args.rounds)


if __name__ == "__main__":
    main()

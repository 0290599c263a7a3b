"""How much latency routerd adds to a request, against calling the same provider directly.

One run starts the mock provider (no artificial latency) and a real `routerd serve`, then
sends the same chat request N times at concurrency 1 and 32: directly with httpx (what an
agent does without routerd), and through routerd's Unix socket with the async and the sync
client. It prints p50/p99 per path and what routerd adds (routerd minus direct).

    ./dev bench            or    .venv/bin/python bench/latency.py --requests 2000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
from routerd_client import AsyncClient, Client

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

KEY = "sk-bench-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(
    call: Callable[[], Awaitable[object]], requests: int, concurrency: int
) -> list[float]:
    """Latency in ms of ``requests`` calls, ``concurrency`` at a time (after a warm-up)."""
    for _ in range(min(20, requests)):
        await call()
    samples: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for _ in counter:
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1000)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return samples


def measure_sync(client: Client, requests: int) -> list[float]:
    """The sync client at concurrency 1, as a plain script would use it."""
    for _ in range(min(50, requests)):
        client.chat("bench", messages=MESSAGES)
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        client.chat("bench", messages=MESSAGES)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(
    base_url: str, socket_path: Path, requests: int
) -> list[tuple[str, int, list[float]]]:
    """All the measurements: (path, concurrency, samples)."""
    rows: list[tuple[str, int, list[float]]] = []
    body = {"model": "m", "messages": MESSAGES}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:

        async def direct() -> object:
            response = await http.post(
                "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
            response.raise_for_status()
            return response.json()

        async with AsyncClient(str(socket_path), name="bench") as client:

            async def routed() -> object:
                return await client.chat("bench", messages=MESSAGES)

            for concurrency in (1, 32):
                # Interleaved in rounds, so that whatever else the machine does in the
                # meantime weighs on both paths alike.
                direct_samples: list[float] = []
                routed_samples: list[float] = []
                rounds = 10
                for _ in range(rounds):
                    direct_samples += await measure(direct, requests // rounds, concurrency)
                    routed_samples += await measure(routed, requests // rounds, concurrency)
                rows.append(("direct httpx", concurrency, direct_samples))
                rows.append(("routerd async", concurrency, routed_samples))
    return rows


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="routerd-bench-", dir="/tmp"))
    spec = MockSpec(keys={KEY: KeySpec("bench")}, models={"m": ModelSpec()}, latency_ms=0)
    with start_mock_process(spec) as mock:
        config = workdir / "config.toml"
        config.write_text(
            f"""
[server]
state_file = "{workdir / "state.msgpack"}"
log_level = "warning"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "bench", key_env = "BENCH_KEY" }}]

[routes.bench]
chain = ["mock/m"]
"""
        )
        socket_path = workdir / "routerd.sock"
        with DaemonProcess(config, socket_path=socket_path, env={"BENCH_KEY": KEY}) as daemon:
            rows = anyio.run(run, mock.base_url, socket_path, args.requests)
            with Client(str(socket_path), name="bench-sync") as client:
                rows.append(("routerd sync", 1, measure_sync(client, args.requests)))
            del daemon
    shutil.rmtree(workdir, ignore_errors=True)
    direct = {c: statistics.median(s) for name, c, s in rows if name == "direct httpx"}
    direct99 = {c: percentile(s, 99) for name, c, s in rows if name == "direct httpx"}
    print(f"routerd latency benchmark: {args.requests} requests per row, mock provider on loopback")
    print(
        f"{'path':16} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}"
    )
    for name, concurrency, samples in rows:
        p50 = statistics.median(samples)
        p99 = percentile(samples, 99)
        added = "" if name == "direct httpx" else f"{p50 - direct[concurrency]:+.3f}"
        added99 = "" if name == "direct httpx" else f"{p99 - direct99[concurrency]:+.3f}"
        print(f"{name:16} {concurrency:>4} {p50:8.3f} {p99:8.3f} {added:>10} {added99:>10}")
    print(f"threads alive at exit: {threading.active_count()}")


if __name__ == "__main__":
    main()

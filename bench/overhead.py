"""routerd's own round trip, with no upstream call in it.

A real daemon (built in this process, on a real Unix socket) whose only provider answers
at once from memory, and a client process that sends N requests one at a time with the
sync and the async client. What it prints is everything routerd costs a request: the
client, the socket both ways, the frame decoding, the plan, the lease, the reply. The
upstream call itself is what `latency.py` adds on top.

    .venv/bin/python bench/overhead.py --requests 5000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio

from routerd import log
from routerd.config.load import parse_config
from routerd.config.secrets import resolve_secrets
from routerd.core.calls import Call, Completion
from routerd.core.outcome import RateLimitReport, Window
from routerd.daemon import Daemon
from routerd.eventloop import loop_options
from routerd.upstream.base import Stream

CLIENT = """
import statistics, sys, time
import anyio
from routerd_client import AsyncClient, Client

path, n = sys.argv[1], int(sys.argv[2])
messages = [{"role": "user", "content": "hi"}]

def report(name, samples):
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    print(f"{name:14} p50 {p50:.3f} ms   p99 {p99:.3f} ms")

with Client(path) as client:
    for _ in range(200):
        client.chat("bench", messages=messages)
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        client.chat("bench", messages=messages)
        samples.append((time.perf_counter() - started) * 1000)
    report("sync client", samples)

async def main():
    async with AsyncClient(path) as client:
        for _ in range(200):
            await client.chat("bench", messages=messages)
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            await client.chat("bench", messages=messages)
            samples.append((time.perf_counter() - started) * 1000)
        report("async client", samples)

anyio.run(main)
"""


class InstantAdapter:
    """An upstream that answers from memory, with rate-limit headers to learn from."""

    kind = "openai"

    async def complete(self, call: Call) -> Completion:
        return Completion(
            text="hi",
            model=call.model,
            finish_reason="stop",
            usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            limits=RateLimitReport(requests=Window(10_000, 9_000, 1.0)),
        )

    def stream(self, call: Call) -> AbstractAsyncContextManager[Stream]:
        """Not measured here."""
        raise NotImplementedError("overhead.py measures whole replies only")


async def run(requests: int) -> None:
    """Serve the daemon until the client process is done."""
    workdir = Path(tempfile.mkdtemp(prefix="routerd-overhead-", dir="/tmp"))
    config = parse_config(
        f"""
[server]
state_file = "{workdir / "state.msgpack"}"
log_level = "warning"

[providers.mem]
kind = "openai-compatible"
base_url = "http://127.0.0.1:9/v1"
credentials = [{{ label = "bench", key_env = "BENCH_KEY" }}]

[routes.bench]
chain = ["mem/m"]
"""
    )
    secrets = resolve_secrets(config, environ={"BENCH_KEY": "sk-bench-0123456789abcdef"})
    daemon = Daemon(config, secrets, socket_path=workdir / "routerd.sock")
    daemon.dispatcher.providers["mem"].adapter = InstantAdapter()
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        print(f"routerd round trip with an instant upstream, {requests} requests one at a time")
        await anyio.run_process(
            [sys.executable, "-c", CLIENT, str(daemon.socket_path), str(requests)],
            stdout=None,
            stderr=None,
        )
        tg.cancel_scope.cancel()
    shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    """Run the measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument(
        "--event-loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="the daemon's loop, as server.event_loop (default: auto, as the daemon)",
    )
    args = parser.parse_args()
    log.configure("warning", "json")
    anyio.run(run, args.requests, backend_options=loop_options(args.event_loop))


if __name__ == "__main__":
    main()

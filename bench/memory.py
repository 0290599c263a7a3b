"""The daemon's memory with 1,000 keys in one pool and 1,000 streams open at once.

A real daemon (``routerd serve``, started by ``routerd.launch.DaemonProcess``) serves one
route over one ``openai-compatible`` provider whose pool holds 1,000 credentials, given
through ``pool_env`` ("label=KEY" entries) and all known to routerd's mock provider on
loopback. Clients then open 1,000 streaming requests at once; each asks the mock (with a
``[[mock:sleep=MS]]`` directive) to hold its reply for ``--hold`` seconds before it streams
it, so all 1,000 are in flight in the daemon together, each with its own upstream call.

The daemon's RSS (VmRSS in /proc/PID/status) and open descriptors are read at start (keys
loaded, no request yet), with every stream open (the daemon's own ``in_flight`` confirms
the count), at the peak of the run (sampled every 50 ms, the streaming included) and after
the last stream ended, and printed against the 100 MB target.

    .venv/bin/python bench/memory.py
    .venv/bin/python bench/memory.py --keys 1000 --streams 1000 --clients 8 --hold 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from routerd_client import AsyncClient

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockSpec, ModelSpec, start_mock_process

TARGET_MB = 100.0
MODEL = "m1"
SAMPLE_S = 0.05


@dataclass(frozen=True)
class Usage:
    """One reading of the daemon process."""

    rss_kib: int
    fds: int

    @property
    def rss_mb(self) -> float:
        """RSS in MB (10^6 bytes), the unit of the target."""
        return self.rss_kib * 1024 / 1e6


def usage(pid: int) -> Usage:
    """RSS (VmRSS, KiB) and open descriptors of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Usage(rss, len(os.listdir(f"/proc/{pid}/fd")))


def raise_nofile() -> tuple[int, int]:
    """Lift this process's soft descriptor limit to the hard one; the (soft, hard) now.

    The mock and the daemon are started from here and inherit it (the daemon raises its own
    too).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class Run:
    """What the streams came to, and the readings taken along the way."""

    done: int = 0
    chunks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[Usage] = field(default_factory=list)


async def hold_streams(
    pid: int, socket: str, streams: int, clients: int, hold_s: float, open_wait_s: float
) -> tuple[Run, Usage, int, float]:
    """Open ``streams`` streams over ``clients`` connections; read the daemon when all are open.

    "Open" means in the daemon's ``in_flight`` and with an upstream connection each (the
    daemon holds at least one descriptor per stream more than it did before). Returns the
    run, the reading then, the daemon's in_flight then, and the seconds it took.
    """
    base_fds = usage(pid).fds
    run = Run()
    prompt = f"[[mock:sleep={hold_s * 1000:.0f}]] hold"
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            run.samples.append(usage(pid))
            await asyncio.sleep(SAMPLE_S)

    async def one(client: AsyncClient, n: int) -> None:
        try:
            async for _chunk in client.stream(
                "pool", messages=[{"role": "user", "content": f"{prompt} {n}"}]
            ):
                run.chunks += 1
        except Exception as exc:  # every failure is a figure of the run
            run.errors[type(exc).__name__] += 1
        else:
            run.done += 1

    pool = [AsyncClient(socket, name=f"memory-{i}") for i in range(clients)]
    for client in pool:
        await client.connect()
    watcher = AsyncClient(socket, name="memory-status")
    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            for n in range(streams):
                tg.create_task(one(pool[n % clients], n))
            # Wait until every stream is in flight with its upstream call open (or the hold
            # is nearly over: then the reading is taken with what is open).
            in_flight = 0
            while time.monotonic() - started < open_wait_s:
                in_flight = (await watcher.status()).in_flight
                if in_flight >= streams and usage(pid).fds >= base_fds + streams:
                    break
                await asyncio.sleep(0.1)
            opened_s = time.monotonic() - started
            at_open = usage(pid)
            in_flight = (await watcher.status()).in_flight
    finally:
        stop_sampling.set()
        await sampler
        await watcher.aclose()
        for client in pool:
            await client.aclose()
    return run, at_open, in_flight, opened_s


def main() -> None:
    """Start the mock and the daemon, hold the streams, print the readings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000, help="credentials in the pool")
    parser.add_argument("--streams", type=int, default=1000, help="streams held open at once")
    parser.add_argument("--clients", type=int, default=8, help="client connections")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the mock holds each")
    args = parser.parse_args()

    soft, hard = raise_nofile()
    keys = {
        f"sk-memory-{n:04d}-{secrets.token_hex(8)}": KeySpec(f"k{n:04d}") for n in range(args.keys)
    }
    spec = MockSpec(keys=keys, models={MODEL: ModelSpec()}, latency_ms=5)
    pool_env = ",".join(f"{s.label}={key}" for key, s in keys.items())
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="routerd-memory-", dir="/tmp") as tmp,
        start_mock_process(spec) as mock,
    ):
        workdir = Path(tmp)
        config = workdir / "memory.toml"
        config.write_text(
            f"""[server]
state_file = "{workdir / "state.msgpack"}"
log_level = "warning"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
pool_env = "MEMORY_POOL"

[routes.pool]
chain = ["mock/{MODEL}"]
"""
        )
        with DaemonProcess(
            config,
            socket_path=workdir / "memory.sock",
            env={"MEMORY_POOL": pool_env, "XDG_STATE_HOME": str(workdir / "xdg")},
            log_path=workdir / "daemon.log",
        ) as daemon:
            pid = daemon.process.pid
            time.sleep(1.0)  # let start-up allocations settle
            at_start = usage(pid)
            credentials = len(asyncio.run(_status_credentials(str(daemon.socket_path))))
            run, at_open, in_flight, opened_s = asyncio.run(
                hold_streams(
                    pid,
                    str(daemon.socket_path),
                    args.streams,
                    args.clients,
                    args.hold,
                    open_wait_s=args.hold * 0.8,
                )
            )
            time.sleep(1.0)
            after = usage(pid)
            calls = mock.stats()["total"]
        peak = max(run.samples, key=lambda u: u.rss_kib, default=after)

    print("routerd memory: 1 pool, many keys, many streams open at once (mock provider)")
    print(
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores; RLIMIT_NOFILE here {soft}/{hard}"
    )
    print(
        f"credentials in the pool: {credentials}; streams: {args.streams} over "
        f"{args.clients} client connections, each held {args.hold:g} s by the mock"
    )
    print(
        f"all open after {opened_s:.1f} s; daemon in_flight then: {in_flight}; "
        f"streams completed {run.done}/{args.streams}, chunks {run.chunks}, "
        f"upstream calls {calls}"
    )
    if run.errors:
        print("errors: " + ", ".join(f"{kind} x{n}" for kind, n in run.errors.most_common()))
    print(f"  {'daemon':28} {'RSS MB':>8} {'fds':>6}  vs {TARGET_MB:g} MB target")
    for name, reading in (
        ("at start (keys loaded)", at_start),
        (f"{in_flight} streams open", at_open),
        (f"peak ({len(run.samples)} samples)", peak),
        ("after (streams done)", after),
    ):
        verdict = "within" if reading.rss_mb <= TARGET_MB else "OVER"
        print(f"  {name:28} {reading.rss_mb:8.1f} {reading.fds:6}  {verdict}")
    per_stream = (at_open.rss_kib - at_start.rss_kib) * 1024 / max(in_flight, 1) / 1e3
    print(f"  growth per open stream: {per_stream:.1f} kB")
    print(f"total run time {time.monotonic() - started:.1f} s")


async def _status_credentials(socket: str) -> list[object]:
    async with AsyncClient(socket, name="memory-status") as client:
        return list((await client.status()).credentials)


if __name__ == "__main__":
    main()

"""Soak: minutes of mixed load and faults against the real daemon; does it stay whole?

The daemon serves a two-target chain on the loopback mock provider while clients send a
steady mix of plain and streamed requests, and a fault schedule plays, round after round:
an outage of the first target, a 429 storm (a burst far past the keys' windows), streams
cut mid-way, client processes killed in the middle of their streams, SIGHUP reloads with a
changed config. Printed at the end: requests, failures by class, p50 / p99 latency, and the
daemon's RSS and open descriptors at start, peak and end.

    .venv/bin/python bench/soak.py                  # ten minutes
    .venv/bin/python bench/soak.py --duration 60    # one minute
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from routerd_client import AsyncClient, RouterdError

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process

KEYS = {
    **{f"sk-soak-{n}": KeySpec(f"k{n}", rpm=600, window_s=5.0) for n in range(4)},
    "sk-soak-revoked": KeySpec("revoked", kind="invalid"),
    "sk-soak-backup": KeySpec("backup", rpm=600, window_s=5.0),
}

CONFIG = """\
[server]
state_file = "{state}"
state_flush_s = 0.5
drain_timeout_s = 10

[providers.primary]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{primary}]

[providers.backup]
kind = "openai-compatible"
base_url = "{base_url}"
credentials = [{{ label = "backup", key_env = "SOAK_BACKUP" }}]

[routes.main]
chain = ["primary/m1", "backup/m2"]
deadline_s = {deadline}
"""

KILLED_CLIENT = """
import sys, anyio
from routerd_client import AsyncClient
async def main():
    async with AsyncClient(sys.argv[1], name="doomed") as c:
        async with anyio.create_task_group() as tg:
            for n in range(8):
                async def one(n=n):
                    async for _ in c.stream("main", messages=[{"role": "user", "content": "x"}]):
                        pass
                tg.start_soon(one)
anyio.run(main)
"""


def write_config(path: Path, mock: MockProcess, workdir: Path, deadline: int) -> None:
    primary = ", ".join(
        f'{{ label = "{k.label}", key_env = "SOAK_{k.label.upper()}" }}'
        for k in KEYS.values()
        if k.label != "backup"
    )
    path.write_text(
        CONFIG.format(
            state=workdir / "state.msgpack",
            base_url=mock.base_url,
            primary=primary,
            deadline=deadline,
        )
    )


def usage(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    """The load, the faults and what was seen."""

    def __init__(self, socket: str, mock: MockProcess, daemon: DaemonProcess) -> None:
        self.socket = socket
        self.mock = mock
        self.daemon = daemon
        self.latencies: list[float] = []
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.samples: list[tuple[int, int]] = []
        self.faults: collections.Counter[str] = collections.Counter()

    async def one(self, client: AsyncClient, n: int) -> None:
        started = time.perf_counter()
        messages = [{"role": "user", "content": f"soak request {n}"}]
        try:
            if n % 3 == 0:
                async for _ in client.stream("main", messages=messages, max_tokens=16):
                    pass
            else:
                await client.chat("main", messages=messages, max_tokens=16)
        except RouterdError as exc:
            self.outcomes[exc.kind] += 1
            return
        self.outcomes["ok"] += 1
        self.latencies.append(time.perf_counter() - started)

    async def steady(self, until: float, workers: int) -> None:
        async with AsyncClient(self.socket, name="soak") as client:

            async def worker(base: int) -> None:
                n = base
                while time.monotonic() < until:
                    await self.one(client, n)
                    n += workers

            async with anyio.create_task_group() as tg:
                for w in range(workers):
                    tg.start_soon(worker, w)

    async def sample(self, until: float) -> None:
        while time.monotonic() < until:
            self.samples.append(usage(self.daemon.process.pid))
            await anyio.sleep(1.0)

    async def fault_rounds(self, until: float, config: Path, workdir: Path) -> None:
        deadline = 30
        while time.monotonic() < until:
            self.mock.set_model("m1", ModelSpec(fault="503"))
            self.faults["outage"] += 1
            await anyio.sleep(2.0)
            self.mock.set_model("m1", ModelSpec())
            await anyio.sleep(3.0)
            self.faults["429 storm"] += 1
            try:
                async with (
                    AsyncClient(self.socket, name="storm") as client,
                    anyio.create_task_group() as tg,
                ):
                    for n in range(200):
                        tg.start_soon(self.one, client, n)
            except RouterdError as exc:  # a daemon that does not even take a connection
                self.outcomes[f"connect: {exc.kind}"] += 1
            self.mock.set_model("m1", ModelSpec(fault="midstream"))
            self.faults["cut streams"] += 1
            await anyio.sleep(1.0)
            self.mock.set_model("m1", ModelSpec())
            await self.kill_a_client()
            deadline = 31 if deadline == 30 else 30
            write_config(config, self.mock, workdir, deadline)
            self.daemon.process.send_signal(signal.SIGHUP)
            self.faults["reload"] += 1
            await anyio.sleep(3.0)

    async def kill_a_client(self) -> None:
        doomed = await anyio.open_process([sys.executable, "-c", KILLED_CLIENT, self.socket])
        await anyio.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
            doomed.kill()
        await doomed.wait()
        await doomed.aclose()
        self.faults["killed client"] += 1


async def run(duration: float, workers: int, log: Path | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="routerd-soak-", dir="/tmp"))
    spec = MockSpec(keys=KEYS, models={"m1": ModelSpec(), "m2": ModelSpec()}, latency_ms=5)
    env = {f"SOAK_{k.label.upper()}": key for key, k in KEYS.items()}
    try:
        with start_mock_process(spec) as mock:
            config = workdir / "config.toml"
            write_config(config, mock, workdir, 30)
            socket = workdir / "routerd.sock"
            with DaemonProcess(config, socket_path=socket, env=env, log_path=log) as daemon:
                soak = Soak(str(socket), mock, daemon)
                start = usage(daemon.process.pid)
                until = time.monotonic() + duration
                async with anyio.create_task_group() as tg:
                    tg.start_soon(soak.sample, until)
                    tg.start_soon(soak.steady, until, workers)
                    tg.start_soon(soak.fault_rounds, until, config, workdir)
                await anyio.sleep(2.0)  # the killed clients' streams end; descriptors close
                end = usage(daemon.process.pid)
                alive = daemon.process.poll() is None
                code = daemon.stop()
        report(soak, start, end, duration, alive, code)
        return 0 if alive and code == 0 else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(
    soak: Soak,
    start: tuple[int, int],
    end: tuple[int, int],
    duration: float,
    alive: bool,
    code: int,
) -> None:
    total = sum(soak.outcomes.values())
    ok = soak.outcomes["ok"]
    lat = sorted(soak.latencies)
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[int(len(lat) * 0.99) - 1] * 1000 if len(lat) >= 100 else float("nan")
    peak_rss = max(s[0] for s in [start, *soak.samples, end])
    peak_fds = max(s[1] for s in [start, *soak.samples, end])
    print(f"soak: {duration:.0f} s, faults played: {dict(soak.faults)}")
    print(f"requests: {total}, served: {ok}, failed: {total - ok}")
    print(f"failures by class: {dict((k, v) for k, v in soak.outcomes.items() if k != 'ok')}")
    print(f"latency of served requests: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(
        f"daemon RSS (MiB): start {start[0] / 1024:.1f}, peak {peak_rss / 1024:.1f}, "
        f"end {end[0] / 1024:.1f}"
    )
    print(f"daemon open descriptors: start {start[1]}, peak {peak_fds}, end {end[1]}")
    print(f"daemon alive to the end: {alive}; exit code after SIGTERM: {code}")


def main() -> int:
    """Parse the arguments and run the soak."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--workers", type=int, default=16, help="steady concurrent requests")
    parser.add_argument("--log", type=Path, help="keep the daemon's log in this file")
    args = parser.parse_args()
    return anyio.run(run, args.duration, args.workers, args.log)


if __name__ == "__main__":
    raise SystemExit(main())

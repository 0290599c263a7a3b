"""Several hosts on one pool of keys: what the shared state ([state] backend = "redis") buys.

Real `routerd serve` daemons, one real mock provider, one real redis-server of its own on a
Unix socket. Three figures:

1. Pool: the pool scenario of compare_litellm.py (3 good keys of 10 requests per 2 s, a
   revoked and an exhausted key, 120 requests) split over two daemons, with the shared
   state and without: served, upstream 429s, calls to the bad keys, wall time against
   the capacity bound.
2. Propagation: host A parks keys while both hosts serve; how long until host B applies
   each park (p50/p99), and whether B ever calls a key A parked.
3. Cost: one daemon's round trip per request with the backend off, on, and on with a
   second host spending the same key (each request then takes its place in the fleet's
   ledger, one round trip to the server).

    .venv/bin/python bench/fleet.py [--rounds 3] [--requests 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
from routerd_client import AsyncClient, Client

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec, start_mock_process
from routerd.redisproc import RedisProcess, server_binary

RPM = 10
WINDOW_S = 2.0
LATENCY_MS = 5.0
TOTAL = 120
CONCURRENCY = 8
PASSWORD = "bench-fleet-redis-password"


@dataclass
class PoolRun:
    served: int
    failed: int
    calls: int
    throttled: int
    bad_calls: int
    wall_s: float


def config(
    mock: MockProcess,
    keys: dict[str, KeySpec],
    workdir: Path,
    name: str,
    redis: RedisProcess | None,
    strategy: str = "headroom",
) -> Path:
    creds = ",\n  ".join(
        f'{{ label = "{s.label}", key_env = "KEY_{s.label.upper()}" }}' for s in keys.values()
    )
    shared = (
        f'[state]\nbackend = "redis"\nurl = "{redis.url}"\nprefix = "bench"\n'
        'password_env = "BENCH_REDIS_PASSWORD"\n'
        if redis is not None
        else ""
    )
    text = f"""
[server]
state_file = "{workdir / (name + ".state")}"
log_level = "info"

{shared}
[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
strategy = "{strategy}"
credentials = [
  {creds}
]

[routes.pool]
chain = ["mock/m1"]
"""
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


def start(path: Path, workdir: Path, name: str, keys: dict[str, KeySpec]) -> DaemonProcess:
    env = {f"KEY_{s.label.upper()}": key for key, s in keys.items()}
    env |= {"BENCH_REDIS_PASSWORD": PASSWORD, "XDG_STATE_HOME": str(workdir / "xdg")}
    env["ROUTERD_LOG_FORMAT"] = "json"
    return DaemonProcess(
        path, socket_path=workdir / f"{name}.sock", env=env, log_path=workdir / f"{name}.log"
    )


def connected(host: DaemonProcess) -> bool:
    with Client(str(host.socket_path)) as client:
        shared = client.status().shared_state
    return shared is not None and shared.connected


def wait_connected(hosts: list[DaemonProcess]) -> None:
    deadline = time.monotonic() + 20
    while not all(connected(h) for h in hosts):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemons did not connect to redis-server")
        time.sleep(0.05)


async def burst(socket: Path, total: int, concurrency: int) -> tuple[int, int]:
    """(served, failed) of ``total`` requests, ``concurrency`` at a time."""
    served = failed = 0
    counter = iter(range(total))
    async with AsyncClient(str(socket), name="bench") as client:

        async def worker() -> None:
            nonlocal served, failed
            for n in counter:
                try:
                    await client.chat("pool", messages=[{"role": "user", "content": f"hi {n}"}])
                    served += 1
                except Exception:
                    failed += 1

        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
    return served, failed


def calls_by_label(mock: MockProcess) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for label, models in mock.stats()["calls"].items():
        merged = out.setdefault(label, {})
        for statuses in models.values():
            for status, count in statuses.items():
                merged[status] = merged.get(status, 0) + count
    return out


def pool_run(workdir: Path, shared: bool) -> PoolRun:
    keys = {
        f"sk-fleet-good{i}-{time.time_ns()}": KeySpec(f"good{i}", rpm=RPM, window_s=WINDOW_S)
        for i in range(3)
    }
    keys[f"sk-fleet-revoked-{time.time_ns()}"] = KeySpec("revoked", kind="invalid")
    keys[f"sk-fleet-exhausted-{time.time_ns()}"] = KeySpec("exhausted", kind="no_quota")
    spec = MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=LATENCY_MS)
    run_dir = Path(tempfile.mkdtemp(prefix="pool-", dir=workdir))
    redis = RedisProcess(run_dir, password=PASSWORD) if shared else None
    hosts: list[DaemonProcess] = []
    try:
        with start_mock_process(spec) as mock:
            for name in ("a", "b"):
                path = config(mock, keys, run_dir, name, redis)
                hosts.append(start(path, run_dir, name, keys))
            if shared:
                wait_connected(hosts)
            results: list[tuple[int, int]] = []

            async def both() -> None:
                async def one(host: DaemonProcess) -> None:
                    results.append(await burst(host.socket_path, TOTAL // 2, CONCURRENCY))

                async with anyio.create_task_group() as group:
                    for host in hosts:
                        group.start_soon(one, host)

            started = time.monotonic()
            anyio.run(both)
            wall = time.monotonic() - started
            calls = calls_by_label(mock)
    finally:
        for host in hosts:
            host.close()
        if redis is not None:
            redis.close()
    good = [s for label, s in calls.items() if label.startswith("good")]
    bad = [s for label, s in calls.items() if not label.startswith("good")]
    return PoolRun(
        served=sum(r[0] for r in results),
        failed=sum(r[1] for r in results),
        calls=sum(sum(s.values()) for s in calls.values()),
        throttled=sum(s.get("429", 0) for s in good),
        bad_calls=sum(sum(s.values()) for s in bad),
        wall_s=wall,
    )


def report_pool(workdir: Path, rounds: int) -> None:
    ideal = (TOTAL // (3 * RPM) - 1) * WINDOW_S + LATENCY_MS / 1000
    print(
        f"\n1. Pool over two hosts: {TOTAL} requests ({TOTAL // 2} per host, {CONCURRENCY} at a "
        f"time each); 3 good keys of {RPM} per {WINDOW_S:g} s, a revoked and an exhausted key."
    )
    print(f"   capacity bound: {ideal:.2f} s\n")
    print(f"   {'':24}{'served':>8}{'429s':>14}{'bad-key calls':>15}{'wall':>9}{'x bound':>9}")
    for shared in (True, False):
        for n in range(rounds):
            run = pool_run(workdir, shared)
            name = "shared state (redis)" if shared else "each host alone"
            share = run.throttled / run.calls if run.calls else 0.0
            print(
                f"   {name if n == 0 else '':24}{f'{run.served}/{TOTAL}':>8}"
                f"{f'{run.throttled} ({share:.1%})':>14}{run.bad_calls:>15}"
                f"{run.wall_s:>8.2f}s{run.wall_s / ideal:>8.2f}x"
            )


def stamps(log: str, event: str) -> dict[str, datetime]:
    """When each credential's ``event`` was first logged."""
    out: dict[str, datetime] = {}
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and entry.get("credential") not in out:
            out[entry["credential"]] = datetime.fromisoformat(entry["timestamp"])
    return out


def report_propagation(workdir: Path, parks: int) -> None:
    broke = {
        f"sk-fleet-broke{i}-{time.time_ns()}": KeySpec(f"broke{i}", kind="no_quota")
        for i in range(parks)
    }
    good = {f"sk-fleet-good-{time.time_ns()}": KeySpec("good")}
    keys = broke | good
    run_dir = Path(tempfile.mkdtemp(prefix="prop-", dir=workdir))
    spec = MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=LATENCY_MS)
    with RedisProcess(run_dir, password=PASSWORD) as redis, start_mock_process(spec) as mock:
        # fill_first: host A reaches the exhausted keys first, host B (its pool in the
        # other order) serves from the good key and must never call one A parked.
        host_a = start(config(mock, keys, run_dir, "a", redis, "fill_first"), run_dir, "a", keys)
        host_b = start(
            config(mock, good | broke, run_dir, "b", redis, "fill_first"), run_dir, "b", keys
        )
        try:
            wait_connected([host_a, host_b])

            async def load_and_park() -> None:
                async with anyio.create_task_group() as group:
                    group.start_soon(burst, host_b.socket_path, 2000, 8)
                    await anyio.sleep(0.2)
                    # Each request parks up to 16 keys (key switches are free), then is served.
                    for _ in range(parks // 16 + 1):
                        await burst(host_a.socket_path, 1, 1)
                        await anyio.sleep(0.05)

            anyio.run(load_and_park)
            time.sleep(0.5)
            learned, applied = (
                stamps(host_a.log_text(), "credential_parked"),
                stamps(host_b.log_text(), "credential_parked"),
            )
            calls = calls_by_label(mock)
        finally:
            host_a.close()
            host_b.close()
    delays = sorted(
        (applied[label] - at).total_seconds() * 1000
        for label, at in learned.items()
        if label in applied
    )
    b_calls = sum(sum(calls.get(s.label, {}).values()) for s in broke.values()) - len(learned)
    print(f"\n2. Propagation: host A parks {len(learned)} keys while both hosts serve")
    if delays:
        p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
        print(
            f"   applied on host B: {len(delays)}/{len(learned)}; delay p50 "
            f"{statistics.median(delays):.1f} ms, p99 {p99:.1f} ms, max {delays[-1]:.1f} ms"
        )
    print(f"   calls to a parked key beyond host A's one each: {b_calls}")


async def timed(socket: Path, n: int) -> list[float]:
    samples = []
    async with AsyncClient(str(socket), name="cost") as client:
        for _ in range(200):
            await client.chat("pool", messages=[{"role": "user", "content": "hi"}])
        for _ in range(n):
            started = time.perf_counter()
            await client.chat("pool", messages=[{"role": "user", "content": "hi"}])
            samples.append((time.perf_counter() - started) * 1000)
    return sorted(samples)


def report_cost(workdir: Path, requests: int) -> None:
    # A limit far above the load: the mock then sends rate-limit headers, so the key's
    # window is known and, with two hosts, every request takes its ledger place.
    keys = {f"sk-fleet-cost-{time.time_ns()}": KeySpec("k", rpm=10_000_000, window_s=60)}
    spec = MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=0)
    print(f"\n3. Cost per request, {requests} sequential requests, mock answering at once")
    rows: list[tuple[str, list[float]]] = []
    with start_mock_process(spec) as mock:
        for label, shared, second in (
            ("backend off", False, False),
            ("backend on, one host", True, False),
            ("backend on, two hosts", True, True),
        ):
            run_dir = Path(tempfile.mkdtemp(prefix="cost-", dir=workdir))
            redis = RedisProcess(run_dir, password=PASSWORD) if shared else None
            hosts = [start(config(mock, keys, run_dir, "a", redis), run_dir, "a", keys)]
            try:
                if second:
                    hosts.append(start(config(mock, keys, run_dir, "b", redis), run_dir, "b", keys))
                if shared:
                    wait_connected(hosts)
                if second:
                    anyio.run(burst, hosts[1].socket_path, 5, 1)
                rows.append((label, anyio.run(timed, hosts[0].socket_path, requests)))
            finally:
                for host in hosts:
                    host.close()
                if redis is not None:
                    redis.close()
    base = statistics.median(rows[0][1])
    for label, samples in rows:
        p50 = statistics.median(samples)
        p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
        print(f"   {label:24} p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({p50 - base:+.3f} ms p50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="pool runs per setting")
    parser.add_argument("--parks", type=int, default=64, help="keys host A parks")
    parser.add_argument("--requests", type=int, default=2000, help="requests for the cost")
    args = parser.parse_args()
    if server_binary() is None:
        raise SystemExit(
            "bench/fleet.py needs redis-server or valkey-server (apt install redis-server)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="rd-fleet-", dir="/tmp"))
    try:
        report_pool(workdir, args.rounds)
        report_propagation(workdir, args.parks)
        report_cost(workdir, args.requests)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Several hosts on one pool of keys: real routerd daemons sharing a real redis-server.

What one host learns of a key (parked, disabled, cooling) reaches the others within a
second; the shared server going away fails no request, and once it is back the hosts
converge again, re-publishing what they learned meanwhile.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import anyio
import pytest
import redis as redis_client
from routerd_client import Client

from routerd.launch import DaemonProcess
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from routerd.redisproc import RedisProcess, server_binary
from tests.conftest import DaemonFactory, canary
from tests.test_e2e_pool import burst, calls_by_label

pytestmark = pytest.mark.skipif(
    server_binary() is None,
    reason="neither redis-server nor valkey-server is installed (./dev test installs it as root)",
)

REDIS_PASSWORD = "redis-canary-" + canary("pw")[-24:]
RPM = 10
WINDOW_S = 2.0
# The bound: what one host learns, every other host acts on within this.
PROPAGATION_S = 1.0


@pytest.fixture
def redis_server(short_dir: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own, on a Unix socket, with a password."""
    directory = short_dir / "redis"
    directory.mkdir()
    with RedisProcess(directory, password=REDIS_PASSWORD) as server:
        yield server


def fleet_config(
    mock: MockProcess,
    keys: dict[str, KeySpec],
    redis: RedisProcess,
    state: Path,
    *,
    strategy: str = "fill_first",
) -> str:
    creds = ",\n  ".join(
        f'{{ label = "{spec.label}", key_env = "KEY_{spec.label.upper()}" }}'
        for spec in keys.values()
    )
    return f"""
[server]
state_file = "{state}"
state_flush_s = 0.2

[state]
backend = "redis"
url = "{redis.url}"
prefix = "fleet-test"
password_env = "TEST_REDIS_PASSWORD"
timeout_s = 0.5

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
strategy = "{strategy}"
quota_park_s = 600
credentials = [
  {creds}
]

[routes.pool]
chain = ["mock/m1"]
deadline_s = 30
"""


def env_for(keys: dict[str, KeySpec]) -> dict[str, str]:
    env = {f"KEY_{spec.label.upper()}": key for key, spec in keys.items()}
    env["TEST_REDIS_PASSWORD"] = REDIS_PASSWORD
    return env


def what_a_user_sees(hosts: list[DaemonProcess], directory: Path) -> list[str]:
    """Each host's log and status, and every state file, as text."""
    texts = []
    for host in hosts:
        with Client(str(host.socket_path)) as client:
            texts += [host.log_text(), repr(client.status())]
    texts += [p.read_bytes().decode(errors="replace") for p in directory.glob("*.state")]
    assert len(texts) > len(hosts) * 2, "no state file was written"
    return texts


def stored_text(redis: RedisProcess) -> str:
    """Every key and string value the shared state server holds, as one text."""
    client = redis_client.Redis(unix_socket_path=str(redis.socket_path), password=REDIS_PASSWORD)
    try:
        parts = []
        for name in client.scan_iter("*"):
            parts.append(name.decode(errors="replace"))
            if client.type(name) == b"string":
                parts.append(repr(client.get(name)))
        return "\n".join(parts)
    finally:
        client.close()


def credential_state(routerd: DaemonProcess, label: str) -> str:
    with Client(str(routerd.socket_path)) as client:
        report = client.status()
    (row,) = [c for c in report.credentials if c.label == label]
    return row.state


def shared_connected(routerd: DaemonProcess) -> bool:
    with Client(str(routerd.socket_path)) as client:
        report = client.status()
    return report.shared_state is not None and report.shared_state.connected


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def all_connected(hosts: Iterable[DaemonProcess], timeout: float = 10, what: str = "") -> None:
    """Wait until every host says its shared state is connected."""
    for host in hosts:
        wait_until(partial(shared_connected, host), timeout, what or "connected to redis")


async def burst_each(
    hosts: Iterable[DaemonProcess], total: int, concurrency: int
) -> tuple[list[object], float]:
    """``total`` requests on each host, all hosts at once: every result, and the wall time."""
    results: list[object] = []

    async def run(host: DaemonProcess) -> None:
        results.extend(await burst(host.socket_path, "pool", total, concurrency))

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for host in hosts:
            group.start_soon(run, host)
    return results, time.monotonic() - started


def ask(routerd: DaemonProcess, n: int = 1) -> None:
    with Client(str(routerd.socket_path)) as client:
        for i in range(n):
            client.chat("pool", messages=[{"role": "user", "content": f"hi {i}"}])


def two_hosts(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis: RedisProcess,
    keys: dict[str, KeySpec],
) -> tuple[MockProcess, DaemonProcess, DaemonProcess]:
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=5))
    hosts = []
    for name in ("a", "b"):
        config = fleet_config(mock, keys, redis, short_dir / f"{name}.state")
        hosts.append(daemon(config, env=env_for(keys), name=name))
    all_connected(hosts)
    return mock, hosts[0], hosts[1]


async def test_a_key_parked_on_one_host_is_skipped_by_the_other_within_a_second(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis_server: RedisProcess,
) -> None:
    # fill_first puts "broke" first on both hosts: whoever tries it first parks it.
    keys = {canary("broke"): KeySpec("broke", kind="no_quota")}
    keys |= {canary("revoked"): KeySpec("revoked", kind="invalid")}
    keys |= {canary("good"): KeySpec("good")}
    mock, host_a, host_b = two_hosts(mock_provider, daemon, short_dir, redis_server, keys)

    ask(host_a)
    assert credential_state(host_a, "broke") == "parked"
    assert credential_state(host_a, "revoked") == "disabled"
    delay = wait_until(
        lambda: (
            credential_state(host_b, "broke") == "parked"
            and credential_state(host_b, "revoked") == "disabled"
        ),
        PROPAGATION_S,
        "host b learns host a's parked and disabled keys",
    )
    ask(host_b, 10)
    calls = calls_by_label(mock)
    assert sum(calls["broke"].values()) == 1, calls
    assert sum(calls["revoked"].values()) == 1, calls
    assert sum(calls["good"].values()) == 11, calls
    print(f"propagation: {delay * 1000:.0f} ms")
    texts = what_a_user_sees([host_a, host_b], short_dir)
    stored = stored_text(redis_server)
    for text in (*texts, stored):
        assert REDIS_PASSWORD not in text
        for key in keys:
            assert key not in text
    # The server holds fingerprints, never a key or a label.
    assert "sha256:" in stored and "broke" not in stored
    assert all("shared_state_connected" in host.log_text() for host in (host_a, host_b))


async def test_the_pool_burst_split_over_two_hosts_stays_inside_the_provider_windows(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis_server: RedisProcess,
) -> None:
    # The pool scenario of test_e2e_pool, its 120 requests split over two hosts.
    keys = {canary(f"good{i}"): KeySpec(f"good{i}", rpm=RPM, window_s=WINDOW_S) for i in range(3)}
    keys |= {canary("revoked"): KeySpec("revoked", kind="invalid")}
    keys |= {canary("broke"): KeySpec("broke", kind="no_quota")}
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=5))
    hosts = []
    for name in ("a", "b"):
        config = fleet_config(mock, keys, redis_server, short_dir / name, strategy="headroom")
        hosts.append(daemon(config, env=env_for(keys), name=name))
    all_connected(hosts)
    results, wall = await burst_each(hosts, 60, 8)
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [], failures[:3]
    assert len(results) == 120
    calls = calls_by_label(mock)
    assert sum(calls.get("revoked", {}).values()) <= 1, calls
    assert sum(calls.get("broke", {}).values()) <= 1, calls
    upstream = sum(sum(s.values()) for s in calls.values())
    throttled = sum(s.get("429", 0) for label, s in calls.items() if label.startswith("good"))
    # The bound for the fleet: at most 2% of the calls run into the provider's 429.
    assert throttled <= 0.02 * upstream, calls
    print(f"two hosts: wall {wall:.2f} s, {throttled} upstream 429s of {upstream} calls")


async def test_redis_killed_mid_run_fails_nothing_and_the_hosts_converge_after(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis_server: RedisProcess,
) -> None:
    keys = {canary(f"good{i}"): KeySpec(f"good{i}") for i in range(2)}
    keys |= {canary("broke"): KeySpec("broke", kind="no_quota")}
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=5))
    # fill_first: host a tries "broke" first, host b lists it last and never reaches it, so
    # only host a's news can tell b.
    broke_first = dict(reversed(list(keys.items())))
    host_a = daemon(
        fleet_config(mock, broke_first, redis_server, short_dir / "a.s"),
        env=env_for(keys),
        name="a",
    )
    host_b = daemon(
        fleet_config(mock, keys, redis_server, short_dir / "b.s"), env=env_for(keys), name="b"
    )
    all_connected((host_a, host_b))

    results: list[object] = []

    async def load(host: DaemonProcess, total: int) -> None:
        results.extend(await burst(host.socket_path, "pool", total, 4))

    async with anyio.create_task_group() as group:
        group.start_soon(load, host_b, 300)
        await anyio.sleep(0.2)
        redis_server.kill()
        await anyio.to_thread.run_sync(
            wait_until, lambda: not shared_connected(host_a), 10, "host a sees the outage"
        )
        # During the outage host a parks "broke"; host b cannot hear of it yet.
        await load(host_a, 100)
        assert credential_state(host_a, "broke") == "parked"
        assert credential_state(host_b, "broke") == "ready"
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [], failures[:3]
    assert len(results) == 400

    redis_server.start()
    all_connected((host_a, host_b), 15, "reconnected after the restart")
    wait_until(
        lambda: credential_state(host_b, "broke") == "parked", 5, "host a re-published its park"
    )
    for host in (host_a, host_b):
        log = host.log_text()
        assert log.count("shared_state_unavailable") == 1, log[-2000:]
        assert "shared_state_reconnected" in log
        assert REDIS_PASSWORD not in log
    assert sum(calls_by_label(mock)["broke"].values()) == 1


async def test_a_reload_keeps_the_link_and_a_key_dropped_on_one_host_stays_on_the_other(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis_server: RedisProcess,
) -> None:
    keys = {canary(f"good{i}"): KeySpec(f"good{i}") for i in range(2)}
    mock, host_a, host_b = two_hosts(mock_provider, daemon, short_dir, redis_server, keys)
    only_good1 = {k: v for k, v in keys.items() if v.label == "good1"}
    host_a.config.write_text(fleet_config(mock, only_good1, redis_server, short_dir / "a.state"))
    host_a.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "config_reloaded" in host_a.log_text(), 10, "host a reloads")
    with Client(str(host_a.socket_path)) as client:
        report = client.status()
    assert [c.label for c in report.credentials] == ["good1"]
    assert report.shared_state is not None and report.shared_state.connected
    with Client(str(host_b.socket_path)) as client:
        assert [c.label for c in client.status().credentials] == ["good0", "good1"]
    ask(host_a, 3)
    ask(host_b, 3)
    calls = calls_by_label(mock)
    # fill_first: host b still serves with the key host a dropped; host a with the other.
    assert calls["good0"] == {"200": 3} and calls["good1"] == {"200": 3}, calls


async def test_configured_rpm_and_max_concurrent_hold_for_the_fleet(
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
    short_dir: Path,
    redis_server: RedisProcess,
) -> None:
    keys = {canary("capped"): KeySpec("capped")}
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec(latency_ms=200)}))
    hosts = []
    for name in ("a", "b"):
        config = fleet_config(mock, keys, redis_server, short_dir / f"{name}.state").replace(
            'key_env = "KEY_CAPPED" }', 'key_env = "KEY_CAPPED", rpm = 4, max_concurrent = 1 }'
        )
        hosts.append(daemon(config, env=env_for(keys), name=name))
    all_connected(hosts)
    ask(hosts[0])  # the key is proven; what follows is limits only
    results, wall = await burst_each(hosts, 3, 3)
    served = [r for r in results if not isinstance(r, Exception)]
    # rpm = 4 for the fleet, one used already: three of the six go, the rest are told at
    # once that the key is full for a minute (past their deadline), not sent.
    assert len(served) == 3, results
    assert sum(calls_by_label(mock)["capped"].values()) == 4
    # max_concurrent = 1 for the fleet: the three went one after another.
    assert wall >= 3 * 0.2, wall

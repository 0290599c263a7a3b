"""The link to the shared state server on a real redis-server: facts go both ways, the
server going away is one warning and a reconnect, and no password shows anywhere."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from routerd_client.protocol import SharedStateStatus, StatusReport

from routerd.config.schema import StateConfig
from routerd.core.credential import Health
from routerd.core.shared import FleetAsk, HealthFact
from routerd.fleet.backend import SharedState
from routerd.fleet.codec import Fact
from routerd.fleet.setup import SharedStateCollector
from routerd.redisproc import RedisProcess, server_binary
from routerd.status import render

pytestmark = pytest.mark.skipif(
    server_binary() is None,
    reason="neither redis-server nor valkey-server is installed (./dev test installs it as root)",
)

PASSWORD = "redis-canary-0b1f2e9d8c7a6b5c4d3e2f1a"


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    directory = Path(tempfile.mkdtemp(prefix="rd-redis-", dir="/tmp"))
    try:
        with RedisProcess(directory, password=PASSWORD) as process:
            yield process
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def link(
    server: RedisProcess,
    got: list[Fact],
    *,
    password: str | None = PASSWORD,
    local: list[Fact] | None = None,
) -> SharedState:
    config = StateConfig(backend="redis", url=server.url, prefix="t", timeout_s=0.5)
    return SharedState(
        config,
        password,
        apply=lambda fact, origin: got.append(fact),
        local_facts=lambda: list(local or []),
    )


async def wait_for(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds; ten seconds at most."""
    with anyio.fail_after(10):
        for _ in itertools.count():
            if check():
                return
            await anyio.sleep(0.01)


PARKED = HealthFact("p", "sha256:abc", Health.PARKED, 2e9, "quota exhausted")


async def test_a_fact_one_host_publishes_reaches_the_other_and_a_late_comer(
    server: RedisProcess,
) -> None:
    got_a: list[Fact] = []
    got_b: list[Fact] = []
    got_c: list[Fact] = []
    a, b = link(server, got_a), link(server, got_b)
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        await group.start(b.run)
        await wait_for(lambda: a.stats.connected and b.stats.connected)
        a.publish(PARKED)
        await wait_for(lambda: PARKED in got_b)
        assert got_a == []  # a host never applies its own facts
        assert b.stats.lag_s is not None and b.stats.lag_s < 1.0
        # A host that starts later reads the stored fact.
        c = link(server, got_c)
        await group.start(c.run)
        await wait_for(lambda: PARKED in got_c)
        group.cancel_scope.cancel()


async def test_only_one_host_gets_the_first_try_of_an_unproven_key(server: RedisProcess) -> None:
    a, b = link(server, []), link(server, [])
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        await group.start(b.run)
        await wait_for(lambda: a.stats.connected and b.stats.connected)
        assert await a.claim("p", "sha256:abc", 2.0) is None
        assert await a.claim("p", "sha256:abc", 2.0) is None  # still a's
        held = await b.claim("p", "sha256:abc", 2.0)
        assert held is not None and 0 < held <= 2.0
        group.cancel_scope.cancel()


async def test_the_ledger_holds_a_window_for_the_whole_fleet(server: RedisProcess) -> None:
    a, b = link(server, []), link(server, [])
    ask = FleetAsk(window_limit=3, window_s=30.0)
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        await group.start(b.run)
        await wait_for(lambda: a.stats.connected and b.stats.connected)
        places = [await host.admit("p", "sha256:abc", ask) for host in (a, b, a)]
        assert places == [(None, None)] * 3
        wait, _ = await b.admit("p", "sha256:abc", ask)
        assert wait is not None and 29.0 < wait <= 30.1
        group.cancel_scope.cancel()


async def test_configured_limits_hold_for_the_fleet_and_leases_come_back(
    server: RedisProcess,
) -> None:
    a, b = link(server, []), link(server, [])
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        await group.start(b.run)
        await wait_for(lambda: a.stats.connected and b.stats.connected)
        rpm = FleetAsk(rpm=2)
        assert (await a.admit("p", "k1", rpm))[0] is None
        assert (await b.admit("p", "k1", rpm))[0] is None
        wait, _ = await a.admit("p", "k1", rpm)
        assert wait is not None and 59.0 < wait <= 60.1
        tpm = FleetAsk(tpm=1000, tokens=600)
        assert (await a.admit("p", "k2", tpm))[0] is None
        wait, _ = await b.admit("p", "k2", tpm)
        assert wait is not None and wait > 59.0
        one = FleetAsk(max_concurrent=1, lease_s=30.0)
        wait, lease = await a.admit("p", "k3", one)
        assert wait is None and lease is not None
        wait, other = await b.admit("p", "k3", one)
        assert wait is not None and wait < 1.0 and other is None
        a.release("p", "k3", lease)
        await wait_for(lambda: not a._released)
        await anyio.sleep(0.05)
        wait, other = await b.admit("p", "k3", one)
        assert wait is None and other is not None
        group.cancel_scope.cancel()


async def test_a_lease_of_a_host_that_died_expires(server: RedisProcess) -> None:
    a, b = link(server, []), link(server, [])
    one = FleetAsk(max_concurrent=1, lease_s=0.3)
    async with anyio.create_task_group() as group:
        await group.start(a.run)
        await group.start(b.run)
        await wait_for(lambda: a.stats.connected and b.stats.connected)
        _, lease = await a.admit("p", "k", one)
        assert lease is not None
        assert (await b.admit("p", "k", one))[0] is not None
        await anyio.sleep(0.4)  # a never gives it back
        assert (await b.admit("p", "k", one))[0] is None
        group.cancel_scope.cancel()


async def test_an_outage_is_one_warning_then_a_reconnect_that_republishes(
    server: RedisProcess,
) -> None:
    got_b: list[Fact] = []
    a = link(server, [], local=[PARKED])
    b = link(server, got_b)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as group:
            await group.start(a.run)
            await wait_for(lambda: a.stats.connected)
            server.kill()
            await wait_for(lambda: not a.stats.connected)
            # Nothing on the request path waits on a server that is away.
            with anyio.fail_after(0.1):
                assert await a.claim("p", "sha256:abc", 2.0) is None
                assert await a.admit("p", "sha256:abc", FleetAsk(rpm=1)) == (None, None)
            await anyio.sleep(1.5)  # several reconnect attempts, still one warning
            server.start()
            await group.start(b.run)
            await wait_for(lambda: a.stats.connected and a.stats.reconnects == 1)
            await wait_for(lambda: PARKED in got_b)
            group.cancel_scope.cancel()
    events = [entry["event"] for entry in logs]
    assert events.count("shared_state_unavailable") == 1, events
    assert "shared_state_reconnected" in events
    assert a.stats.errors >= 1
    assert PASSWORD not in repr(logs)


async def test_a_wrong_password_is_reported_without_the_password(server: RedisProcess) -> None:
    wrong = "redis-canary-wrong-6f1ed002ab5595859014"
    a = link(server, [], password=wrong)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as group:
            await group.start(a.run)
            await wait_for(lambda: a.stats.errors >= 1)
            group.cancel_scope.cancel()
    assert not a.stats.connected
    assert [entry["event"] for entry in logs].count("shared_state_unavailable") == 1
    assert wrong not in repr(logs) and PASSWORD not in repr(logs)


def test_status_shows_the_backend_and_a_lost_link() -> None:
    report = StatusReport(
        id=1,
        version="x",
        uptime_s=1.0,
        connections=0,
        in_flight=0,
        credentials=[],
        targets=[],
        routes=[],
        shared_state=SharedStateStatus("redis", "unix:///run/redis.sock", False, errors=3),
    )
    text = render(report)
    assert "shared state: redis unix:///run/redis.sock" in text
    assert "DISCONNECTED" in text and "errors 3" in text


def test_metrics_count_the_links_errors_and_lag() -> None:
    config = StateConfig(backend="redis", url="unix:///nowhere.sock")
    shared = SharedState(config, None, apply=lambda fact, origin: None, local_facts=list)
    shared.stats.errors, shared.stats.lag_s, shared.stats.received = 2, 0.004, 7
    registry = CollectorRegistry()
    registry.register(SharedStateCollector(shared))
    text = generate_latest(registry).decode()
    assert "routerd_shared_state_connected 0.0" in text
    assert "routerd_shared_state_errors_total 2.0" in text
    assert "routerd_shared_state_lag_seconds 0.004" in text
    assert 'routerd_shared_state_facts_total{direction="received"} 7.0' in text

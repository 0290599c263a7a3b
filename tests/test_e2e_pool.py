"""The scenarios a user runs first, on the real daemon process over its real Unix socket.

Pool: three good keys of limited rpm plus an invalid and an out-of-quota one.
Outage: the primary target answers 503 and the chain has a second target.
Restart: the invalid and out-of-quota keys stay out of use across a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from routerd_client import AsyncClient, Client

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

RPM = 10
WINDOW_S = 2.0
LATENCY_MS = 5.0


def pool_keys() -> dict[str, KeySpec]:
    keys = {canary(f"good{i}"): KeySpec(f"good{i}", rpm=RPM, window_s=WINDOW_S) for i in range(3)}
    keys[canary("invalid")] = KeySpec("invalid", kind="invalid")
    keys[canary("broke")] = KeySpec("broke", kind="no_quota")
    return keys


def pool_config(mock: MockProcess, keys: dict[str, KeySpec], state: Path, extra: str = "") -> str:
    creds = ",\n  ".join(
        f'{{ label = "{spec.label}", key_env = "KEY_{spec.label.upper()}" }}'
        for spec in keys.values()
    )
    return f"""
[server]
state_file = "{state}"
state_flush_s = 0.2

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [
  {creds}
]

[routes.pool]
chain = ["mock/m1"]
deadline_s = 30
{extra}
"""


def key_env(keys: dict[str, KeySpec]) -> dict[str, str]:
    return {f"KEY_{spec.label.upper()}": key for key, spec in keys.items()}


def calls_by_label(mock: MockProcess) -> dict[str, dict[str, int]]:
    """{label: {status: count}} summed over models."""
    out: dict[str, dict[str, int]] = {}
    for label, models in mock.stats()["calls"].items():
        merged = out.setdefault(label, {})
        for statuses in models.values():
            for status, count in statuses.items():
                merged[status] = merged.get(status, 0) + count
    return out


async def burst(socket: Path, route: str, total: int, concurrency: int) -> list[object]:
    """Send ``total`` requests, ``concurrency`` at a time, over one connection."""
    results: list[object] = []
    counter = iter(range(total))
    async with AsyncClient(str(socket), name="burst") as client:

        async def worker() -> None:
            for n in counter:
                try:
                    results.append(
                        await client.chat(route, messages=[{"role": "user", "content": f"hi {n}"}])
                    )
                except Exception as exc:  # collected, so the test can say what failed
                    results.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return results


async def test_pool_serves_every_request_without_hammering_bad_keys(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory, short_dir: Path
) -> None:
    keys = pool_keys()
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=LATENCY_MS))
    routerd = daemon(pool_config(mock, keys, short_dir / "state"), env=key_env(keys))

    started = time.monotonic()
    results = await burst(routerd.socket_path, "pool", 120, 16)
    wall = time.monotonic() - started

    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [], failures[:3]
    assert len(results) == 120
    calls = calls_by_label(mock)
    assert sum(calls.get("invalid", {}).values()) <= 1
    assert sum(calls.get("broke", {}).values()) <= 1
    upstream = sum(sum(s.values()) for s in calls.values())
    throttled = sum(s.get("429", 0) for label, s in calls.items() if label.startswith("good"))
    assert throttled <= 0.05 * upstream, calls
    # Capacity: 3 keys x 10 requests per 2 s sliding window, so 120 requests need the
    # initial burst plus three more windows; the router should come within 1.25x of that.
    ideal = (120 // (3 * RPM) - 1) * WINDOW_S + LATENCY_MS / 1000
    assert wall <= 1.25 * ideal, f"wall {wall:.2f}s vs ideal {ideal:.2f}s"

    log = routerd.log_text()
    for key in keys:
        assert key not in log


async def test_outage_sends_only_probes_to_the_dead_target(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory, short_dir: Path
) -> None:
    primary, backup = canary("primary"), canary("backup")
    mock = mock_provider(
        MockSpec(
            keys={primary: KeySpec("primary"), backup: KeySpec("backup")},
            models={"dead": ModelSpec(fault="503"), "alive": ModelSpec()},
            latency_ms=LATENCY_MS,
        )
    )
    config = f"""
[breaker]
failure_threshold = 3
open_s = 1.0
max_open_s = 2.0

[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "primary", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "backup", key_env = "KEY_B" }}]

[routes.main]
chain = ["a/dead", "b/alive"]
"""
    routerd = daemon(config, env={"KEY_A": primary, "KEY_B": backup})
    concurrency = 8
    started = time.monotonic()
    results = await burst(routerd.socket_path, "main", 120, concurrency)
    elapsed = time.monotonic() - started

    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [], failures[:3]
    dead_calls = sum(mock.stats()["calls"].get("primary", {}).get("dead", {}).values())
    # At a cold start the requests already in flight when the target first fails reach it;
    # after that only breaker probes do: at most one per open period (1 s, then 2 s).
    probes = int(elapsed / 1.0) + 1
    assert dead_calls <= concurrency + probes, (dead_calls, elapsed)
    assert dead_calls < 120 // 4
    with Client(str(routerd.socket_path)) as client:
        report = client.status()
    breaker = {t.target: t.breaker for t in report.targets}
    assert breaker["a/dead"] in ("open", "half_open")
    assert breaker["b/alive"] == "closed"


async def test_outage_mid_run_on_a_warm_daemon(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory
) -> None:
    primary, backup = canary("primary"), canary("backup")
    mock = mock_provider(
        MockSpec(
            keys={primary: KeySpec("primary"), backup: KeySpec("backup")},
            models={"m": ModelSpec(), "alive": ModelSpec()},
            latency_ms=LATENCY_MS,
        )
    )
    config = f"""
[breaker]
open_s = 30.0

[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "primary", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "backup", key_env = "KEY_B" }}]

[routes.main]
chain = ["a/m", "b/alive"]
"""
    routerd = daemon(config, env={"KEY_A": primary, "KEY_B": backup})
    warm = await burst(routerd.socket_path, "main", 10, 1)
    assert all(getattr(r, "provider", None) == "a" for r in warm), warm
    mock.set_model("m", ModelSpec(fault="503"))
    mock.reset()
    concurrency = 4
    results = await burst(routerd.socket_path, "main", 100, concurrency)
    assert all(getattr(r, "provider", None) == "b" for r in results), results[:3]
    dead = sum(mock.stats()["calls"].get("primary", {}).get("m", {}).values())
    # Only the calls already in flight when the outage began: the first failure turns the
    # breaker suspect (one probe at a time), the third opens it for longer than the run.
    assert 1 <= dead <= concurrency


async def test_restart_does_not_rehit_invalid_or_exhausted_keys(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory, short_dir: Path
) -> None:
    keys = pool_keys()
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=LATENCY_MS))
    state = short_dir / "state.msgpack"
    config = pool_config(mock, keys, state)
    first = daemon(config, env=key_env(keys), name="first")
    results = await burst(first.socket_path, "pool", 20, 5)
    assert not [r for r in results if isinstance(r, Exception)]
    calls = calls_by_label(mock)
    assert calls["invalid"] == {"401": 1} and calls["broke"] == {"429": 1}
    assert first.stop() == 0
    assert "STOPPING=1" in first.notifications

    raw = state.read_bytes()
    for key in keys:
        assert key.encode() not in raw

    mock.reset()
    second = daemon(config, env=key_env(keys), name="second")
    results = await burst(second.socket_path, "pool", 20, 5)
    assert not [r for r in results if isinstance(r, Exception)]
    calls = calls_by_label(mock)
    assert "invalid" not in calls and "broke" not in calls, calls
    with Client(str(second.socket_path)) as client:
        report = client.status()
    states = {c.label: c.state for c in report.credentials}
    assert states["invalid"] == "disabled" and states["broke"] == "parked"
    as_json = json.dumps([c.label for c in report.credentials])
    for key in keys:
        assert key not in as_json

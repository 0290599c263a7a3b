"""What must reach the state file at once: a key found revoked or out of quota.

The regular flush runs every ``state_flush_s``; a park or a disable does not wait for it,
so a daemon killed right after learning it does not re-hit the key when it starts again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec

from routerd.mock import MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory
from tests.test_e2e_pool import burst, calls_by_label, key_env, pool_config, pool_keys


def saved_health(state: Path) -> dict[str, str]:
    """{label: health} of the credentials in the state file that are not ready."""
    try:
        saved = msgspec.msgpack.decode(state.read_bytes())
    except (OSError, msgspec.DecodeError):
        return {}
    return {c["label"]: c["health"] for c in saved["credentials"] if c["health"] != "ready"}


async def test_a_revoked_or_exhausted_key_survives_kill_9_right_after(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory, short_dir: Path
) -> None:
    keys = pool_keys()
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=5.0))
    state = short_dir / "state.msgpack"
    # A flush interval far longer than the test: only the immediate write can save it.
    config = pool_config(mock, keys, state).replace("state_flush_s = 0.2", "state_flush_s = 600")
    first = daemon(config, env=key_env(keys), name="first")
    results = await burst(first.socket_path, "pool", 20, 5)
    assert not [r for r in results if isinstance(r, Exception)]
    calls = calls_by_label(mock)
    assert calls["invalid"] == {"401": 1} and calls["broke"] == {"429": 1}
    deadline = time.monotonic() + 5
    while saved_health(state) != {"invalid": "disabled", "broke": "parked"}:
        assert time.monotonic() < deadline, "the park and the disable were not written at once"
        await anyio.sleep(0.02)
    first.process.kill()
    first.process.wait()

    mock.reset()
    second = daemon(config, env=key_env(keys), name="second")
    results = await burst(second.socket_path, "pool", 20, 5)
    assert not [r for r in results if isinstance(r, Exception)]
    calls = calls_by_label(mock)
    assert "invalid" not in calls and "broke" not in calls, calls

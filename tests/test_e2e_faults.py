"""Transport faults on the real daemon: a provider that hangs, one that resets the connection."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from routerd_client import AsyncClient, TargetDown

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary


def chain_config(mock: MockProcess, *, with_backup: bool = True) -> str:
    chain = '["a/broken", "b/ok"]' if with_backup else '["a/broken"]'
    return f"""
[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
timeout_s = 0.5
credentials = [{{ label = "a", key_env = "KEY_A" }}]

[providers.b]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "b", key_env = "KEY_B" }}]

[routes.r]
chain = {chain}
deadline_s = 10
retries = 0
"""


@pytest.mark.parametrize(
    ("fault", "words"), [("timeout", "read timeout after 0.5s"), ("reset", "read error")]
)
async def test_a_hanging_or_resetting_provider_falls_back_and_is_named(
    fault: str,
    words: str,
    mock_provider: Callable[[MockSpec], MockProcess],
    daemon: DaemonFactory,
) -> None:
    key_a, key_b = canary("a"), canary("b")
    mock = mock_provider(
        MockSpec(
            keys={key_a: KeySpec("a"), key_b: KeySpec("b")},
            models={"broken": ModelSpec(fault=fault), "ok": ModelSpec()},  # type: ignore[arg-type]
        )
    )
    routerd = daemon(chain_config(mock), env={"KEY_A": key_a, "KEY_B": key_b})
    async with AsyncClient(str(routerd.socket_path)) as client:
        started = time.monotonic()
        result = await client.chat("r", messages=[{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - started
        assert result.provider == "b"
        first = result.attempts[0]
        assert (first.target, first.outcome) == ("a/broken", "target_down")
        assert first.message is not None and words in first.message
        assert elapsed < 3.0  # the provider's timeout_s, not the route's 10 s deadline
        status = await client.status()
    assert {t.target: t.failures for t in status.targets}["a/broken"] == 1
    # A transport fault says nothing about the key: it stays ready.
    assert {c.label: c.state for c in status.credentials}["a"] == "ready"


async def test_with_no_fallback_the_client_gets_target_down(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory
) -> None:
    key_a, key_b = canary("a"), canary("b")
    mock = mock_provider(
        MockSpec(
            keys={key_a: KeySpec("a"), key_b: KeySpec("b")},
            models={"broken": ModelSpec(fault="reset"), "ok": ModelSpec()},
        )
    )
    routerd = daemon(chain_config(mock, with_backup=False), env={"KEY_A": key_a, "KEY_B": key_b})
    async with AsyncClient(str(routerd.socket_path)) as client:
        with pytest.raises(TargetDown) as caught:
            await client.chat("r", messages=[{"role": "user", "content": "hi"}])
    assert [a.outcome for a in caught.value.attempts] == ["target_down"]
    assert "every target is down" in caught.value.message

"""Long-context lanes end to end: the real daemon, the real mock provider speaking Anthropic.

The model has a small window (2000 tokens) and a long one (20000) behind the context-1m beta,
so a "long" prompt of ~3000 tokens is cheap. Key "a" may not make long requests ("Extra usage
is required for long context requests."), key "b" may. Short requests must keep flowing on
both keys at full rate while long ones go where they fit, or come back as a typed downgrade.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from routerd_client import AsyncClient, ContextOverflow, ContextTierDowngrade
from routerd_client.protocol import Attempt, Result, StatusReport

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

WINDOW = 2000
LONG_WINDOW = 20000
BIG_WINDOW = 32000
MAX_TOKENS = 64
# ~3000 tokens at four characters a token: past the 2000 window, well inside the long one.
LONG_PROMPT = "lorem ipsum " * 1000
KEY_A, KEY_B, KEY_O = canary("a"), canary("b"), canary("o")

MockFactory = Callable[[MockSpec], MockProcess]


def claude(**extra: Any) -> ModelSpec:
    return ModelSpec(context_window=WINDOW, long_context_window=LONG_WINDOW, **extra)


def config(mock: MockProcess, labels: list[str], *, big: bool = False) -> str:
    """Anthropic keys ``labels`` on claude; with ``big``, an OpenAI-compatible target after it."""
    creds = ", ".join(
        f'{{ label = "{label}", key_env = "KEY_{label.upper()}" }}' for label in labels
    )
    chain = '"anthropic/claude", "openai/big"' if big else '"anthropic/claude"'
    text = f"""
[providers.anthropic]
kind = "anthropic"
base_url = "{mock.url}"
credentials = [{creds}]

[models."anthropic/claude"]
context_window = {WINDOW}
long_context_window = {LONG_WINDOW}

[routes.main]
chain = [{chain}]
deadline_s = 20
"""
    if big:
        text += f"""
[providers.openai]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "o", key_env = "KEY_O" }}]

[models."openai/big"]
context_window = {BIG_WINDOW}
"""
    return text


ENV = {"KEY_A": KEY_A, "KEY_B": KEY_B, "KEY_O": KEY_O}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def calls(mock: MockProcess, label: str, model: str) -> dict[str, int]:
    """{status: count} of the mock's calls for one key and model ("claude#long": long ones)."""
    found: dict[str, int] = mock.stats()["calls"].get(label, {}).get(model, {})
    return found


async def routerd_status(socket: Path) -> dict[str, Any]:
    """What `routerd status --json` prints, parsed."""
    argv = [sys.executable, "-m", "routerd", "status", "--json", "--socket", str(socket)]
    shown = await anyio.run_process(argv)
    status: dict[str, Any] = json.loads(shown.stdout)
    return status


async def ready_again(client: AsyncClient, label: str) -> None:
    """Wait until the credential is ready with room in its request window (at most 5 s)."""
    with anyio.fail_after(5):
        while True:
            report = await client.status()
            credential = next(c for c in report.credentials if c.label == label)
            if credential.state == "ready" and credential.remaining_requests != 0:
                return
            await anyio.sleep(0.1)


def lane_cooling(report: StatusReport, label: str) -> float | None:
    """How long the credential's long-context lane still cools, per the status report."""
    credential = next(c for c in report.credentials if c.label == label)
    lane = next(lane for lane in credential.lanes if lane.name == "long_context")
    return lane.cooling_for


@dataclass(slots=True)
class Sent:
    """One request of a mixed run: what it was, when it went and came back, and its reply."""

    kind: str
    sent: float
    done: float
    reply: Result | Exception


async def mixed_run(socket: Path, jobs: list[str], concurrency: int) -> list[Sent]:
    """Send ``jobs`` ("short"/"long"), ``concurrency`` at a time in order, over one connection."""
    log: list[Sent] = []
    queue = iter(enumerate(jobs))
    async with AsyncClient(str(socket), name="mixed") as client:

        async def worker() -> None:
            for n, kind in queue:
                prompt = LONG_PROMPT if kind == "long" else f"short request {n}"
                sent = time.monotonic()
                reply: Result | Exception
                try:
                    reply = await client.chat("main", user(prompt), max_tokens=MAX_TOKENS)
                except Exception as exc:  # collected, so the assertion can say what failed
                    reply = exc
                log.append(Sent(kind, sent, time.monotonic(), reply))

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return log


async def test_long_429s_leave_short_requests_at_full_rate(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mock_provider(
        MockSpec(
            keys={KEY_A: KeySpec("a", long_context=False), KEY_B: KeySpec("b")},
            models={"claude": claude()},
            latency_ms=20,
        )
    )
    routerd = daemon(config(mock, ["a", "b"]), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="warm") as client:
        # Both keys have served requests before: neither is on its first-request probation.
        warm = [await client.chat("main", user("warm"), max_tokens=MAX_TOKENS) for _ in range(4)]
        assert {r.credential for r in warm} == {"a", "b"}
    # Three long requests at once, then one in every four.
    jobs = ["long"] * 3 + ["long" if n % 4 == 0 else "short" for n in range(1, 24)]
    assert jobs.count("long") == 8 and jobs.count("short") == 18
    log = await mixed_run(routerd.socket_path, jobs, concurrency=6)
    async with AsyncClient(str(routerd.socket_path), name="status") as client:
        report = await client.status()

    failures = [s for s in log if isinstance(s.reply, Exception)]
    assert failures == []
    served = [(s, s.reply) for s in log if isinstance(s.reply, Result)]
    shorts = [(s, r) for s, r in served if s.kind == "short"]
    longs = [(s, r) for s, r in served if s.kind == "long"]
    assert len(shorts) == 18 and len(longs) == 8
    # Short requests never met a 429 or a retry, and both keys kept serving them ...
    assert all(len(r.attempts) == 1 for _, r in shorts)
    assert {r.credential for _, r in shorts} == {"a", "b"}
    # ... "a" included after its long-context 429 came back.
    refused = [s.done for s, r in longs if ("a", "long_context_limited") in _trail(r.attempts)]
    assert len(refused) == 1
    assert any(r.credential == "a" and s.sent > refused[0] for s, r in shorts)
    # Every long request was served by the key whose lane holds it; "a" saw one long call:
    # the first one closed its lane and no other long request reached it.
    assert {r.credential for _, r in longs} == {"b"}
    assert calls(mock, "a", "claude#long") == {"429": 1}
    assert calls(mock, "b", "claude#long") == {"200": 8}
    short_calls = {k: calls(mock, k, "claude") for k in ("a", "b")}
    assert all(set(c) == {"200"} for c in short_calls.values()), short_calls
    # Only the lane cools: both keys stay ready, and "a"'s long lane shows as cooling.
    assert {c.label: c.state for c in report.credentials} == {"a": "ready", "b": "ready"}
    cooling = lane_cooling(report, "a")
    assert cooling is not None and cooling > 0
    assert lane_cooling(report, "b") is None


def _trail(attempts: list[Attempt]) -> list[tuple[str, str]]:
    return [(a.credential, a.outcome) for a in attempts]


async def test_no_lane_holds_it_downgrade_with_the_short_window(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mock_provider(
        MockSpec(
            keys={KEY_A: KeySpec("a", long_context=False), KEY_B: KeySpec("b", long_context=False)},
            models={"claude": claude()},
        )
    )
    routerd = daemon(config(mock, ["a", "b"]), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="downgrade") as client:
        with pytest.raises(ContextTierDowngrade) as caught:
            await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        error = caught.value
        assert error.largest_window == WINDOW  # the short window is what is available now
        assert error.long_lane_back_in is not None and 0 < error.long_lane_back_in <= 60
        assert [a.outcome for a in error.attempts] == ["long_context_limited"] * 2
        assert {a.credential for a in error.attempts} == {"a", "b"}
        # Asked again at once: the lanes are known to be cooling, so no upstream call.
        with pytest.raises(ContextTierDowngrade):
            await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        short = await client.chat("main", user("a short one"), max_tokens=MAX_TOKENS)
    assert short.text.endswith("a short one") and short.provider == "anthropic"
    assert calls(mock, "a", "claude#long") == {"429": 1}
    assert calls(mock, "b", "claude#long") == {"429": 1}


async def test_a_long_request_moves_to_a_target_that_holds_it(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mock_provider(
        MockSpec(
            keys={
                KEY_A: KeySpec("a", long_context=False),
                KEY_B: KeySpec("b", long_context=False),
                KEY_O: KeySpec("o"),
            },
            models={"claude": claude(), "big": ModelSpec(context_window=BIG_WINDOW)},
        )
    )
    routerd = daemon(config(mock, ["a", "b"], big=True), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="moves") as client:
        first = await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        second = await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        short = await client.chat("main", user("short"), max_tokens=MAX_TOKENS)
    assert (first.provider, first.target) == ("openai", "openai/big")
    assert [a.outcome for a in first.attempts] == ["long_context_limited"] * 2 + ["ok"]
    # Once both lanes cool, the long request goes straight to the target that holds it.
    assert (second.target, len(second.attempts)) == ("openai/big", 1)
    assert short.target == "anthropic/claude"
    assert calls(mock, "o", "big") == {"200": 2}
    long_calls = sum(calls(mock, k, "claude#long").get("429", 0) for k in ("a", "b"))
    assert long_calls == 2


async def test_long_requests_use_the_lane_again_after_its_reset(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mock_provider(
        MockSpec(
            keys={KEY_B: KeySpec("b", long_context_rpm=1, window_s=2)},
            models={"claude": claude()},
        )
    )
    routerd = daemon(config(mock, ["b"]), env=ENV)
    async with AsyncClient(str(routerd.socket_path), name="reset") as client:
        first = await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        assert first.credential == "b"
        with pytest.raises(ContextTierDowngrade) as caught:
            await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
        back_in = caught.value.long_lane_back_in
        assert back_in is not None and 1.0 <= back_in <= 2.5
        assert caught.value.largest_window == WINDOW
        # `routerd status --json`, as a user would look: the lane cools, the key is ready.
        status = await routerd_status(routerd.socket_path)
        (b,) = status["credentials"]
        assert b["state"] == "ready"
        lane = next(lane for lane in b["lanes"] if lane["name"] == "long_context")
        assert 0 < lane["cooling_for"] <= back_in
        assert KEY_B not in json.dumps(status)
        # The same key keeps serving short requests while its long lane cools.
        short = await client.chat("main", user("meanwhile"), max_tokens=MAX_TOKENS)
        assert short.credential == "b"
        await anyio.sleep(back_in + 0.5)
        again = await client.chat("main", user(LONG_PROMPT), max_tokens=MAX_TOKENS)
    assert again.credential == "b" and len(again.attempts) == 1
    assert calls(mock, "b", "claude#long") == {"200": 2, "429": 1}


async def test_a_request_bigger_than_every_window_fails_without_an_upstream_call(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    mock = mock_provider(
        MockSpec(
            keys={KEY_A: KeySpec("a"), KEY_O: KeySpec("o")},
            models={"claude": claude(), "big": ModelSpec(context_window=BIG_WINDOW)},
        )
    )
    routerd = daemon(config(mock, ["a"], big=True), env=ENV)
    huge = "lorem ipsum " * 12_000  # ~36000 tokens: past the 32000 window too
    async with AsyncClient(str(routerd.socket_path), name="overflow") as client:
        warm = await client.chat("main", user("warm up"), max_tokens=MAX_TOKENS)
        assert warm.target == "anthropic/claude"
        before = mock.stats()
        with pytest.raises(ContextOverflow) as caught:
            await client.chat("main", user(huge), max_tokens=MAX_TOKENS)
    error = caught.value
    assert error.attempts == []
    assert str(BIG_WINDOW) in error.message
    assert error.details is not None
    assert error.details["largest_window"] == BIG_WINDOW
    assert error.details["requested_tokens"] > BIG_WINDOW
    assert str(error.details["requested_tokens"]) in error.message
    assert mock.stats() == before


async def test_an_ordinary_429_never_shrinks_the_window(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    keys = {
        KEY_A: KeySpec("a", rpm=2, window_s=1),
        KEY_B: KeySpec("b", rpm=2, window_s=1),
        KEY_O: KeySpec("o"),
    }
    mock = mock_provider(
        MockSpec(
            keys=keys, models={"claude": claude(), "big": ModelSpec(context_window=BIG_WINDOW)}
        )
    )
    routerd = daemon(config(mock, ["a", "b"], big=True), env=ENV)
    async with (
        AsyncClient(str(routerd.socket_path), name="no-shrink") as client,
        httpx.AsyncClient(base_url=mock.url) as direct,
    ):
        # Someone else spends both keys' windows behind routerd's back, so routerd meets real
        # rate-limit 429s (not long-context ones) on each.
        for key in (KEY_A, KEY_B):
            for _ in range(2):
                spent = await direct.post(
                    "/v1/messages",
                    headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                    json={"model": "claude", "max_tokens": 8, "messages": user("elsewhere")},
                )
                assert spent.status_code == 200
        spilled = await client.chat("main", user("now"), max_tokens=MAX_TOKENS)
        assert [(a.target, a.outcome, a.status) for a in spilled.attempts] == [
            ("anthropic/claude", "rate_limited", 429),
            ("anthropic/claude", "rate_limited", 429),
            ("openai/big", "ok", 200),
        ]
        # Once the windows reset, a request just under the 2000 window goes to that target,
        # on the short lane: the 429s shrank nothing.
        await ready_again(client, "a")
        await ready_again(client, "b")
        near = "x" * (1900 * 4)  # 1900 tokens
        reply = await client.chat("main", user(near), max_tokens=16)
    assert reply.target == "anthropic/claude" and len(reply.attempts) == 1
    assert reply.usage["prompt_tokens"] == 1900
    short_calls = [calls(mock, k, "claude") for k in ("a", "b")]
    assert sum(c.get("429", 0) for c in short_calls) == 2
    assert sum(c.get("200", 0) for c in short_calls) == 4 + 1
    assert calls(mock, "a", "claude#long") == {} and calls(mock, "b", "claude#long") == {}

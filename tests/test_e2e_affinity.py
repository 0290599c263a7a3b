"""Conversation affinity end to end: the real daemon, the mock modelling prompt caches.

The mock caches prompt prefixes per organisation (one per key here): a conversation that
stays on its key gets each follow-up turn's earlier turns as cached tokens; on any other
key it pays for them again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
from routerd_client import AsyncClient, Client

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]


def keys_of(rpm: int, window_s: float = 60.0) -> dict[str, KeySpec]:
    return {canary(f"k{i}"): KeySpec(f"k{i}", rpm=rpm, window_s=window_s) for i in range(4)}


def config(mock: MockProcess, keys: dict[str, KeySpec]) -> str:
    creds = ", ".join(
        f'{{ label = "{s.label}", key_env = "KEY_{s.label.upper()}" }}' for s in keys.values()
    )
    return f"""
[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{creds}]

[routes.main]
chain = ["mock/m1"]
deadline_s = 30
"""


def env_of(keys: dict[str, KeySpec]) -> dict[str, str]:
    return {f"KEY_{s.label.upper()}": secret for secret, s in keys.items()}


def converse(client: Client, session: str, turns: int) -> list[tuple[str, int]]:
    """A conversation of ``turns``, each sending the whole history: (key, cached tokens)."""
    history: list[dict[str, Any]] = []
    seen = []
    for n in range(turns):
        history.append({"role": "user", "content": f"turn {n}: " + "context " * 40})
        result = client.chat("main", messages=history, session=session)
        history.append({"role": "assistant", "content": result.text})
        seen.append((result.credential, result.usage.get("cached_tokens", 0)))
    return seen


def test_a_conversation_stays_on_one_key_with_its_cache(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    keys = keys_of(rpm=1000)
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=1))
    routerd = daemon(config(mock, keys), env=env_of(keys))
    with Client(str(routerd.socket_path)) as client:
        seen = converse(client, "conversation-a", 20)
        # The same turns without a conversation key: rotated over the pool's keys.
        rotated = [
            client.chat("main", messages=[{"role": "user", "content": "x"}]) for _ in range(8)
        ]
        status = client.status()
    assert len({key for key, _ in seen}) == 1
    follow_ups = [cached for _, cached in seen[1:]]
    assert sum(1 for cached in follow_ups if cached > 0) >= 0.95 * len(follow_ups)
    assert len({r.credential for r in rotated}) > 1  # headroom spreads plain requests
    assert status.affinity.turns == {"new": 1, "sticky": 19}
    held = {c.label: c.sessions for c in status.credentials}
    assert sorted(held.values()) == [0, 0, 0, 1]


def test_a_conversation_moves_once_when_its_key_runs_dry(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    # Five requests a minute per key: the sixth turn cannot stay.
    keys = keys_of(rpm=5)
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=1))
    routerd = daemon(config(mock, keys), env=env_of(keys))
    with Client(str(routerd.socket_path)) as client:
        seen = converse(client, "conversation-b", 9)
        status = client.status()
    used = [key for key, _ in seen]
    assert len(set(used)) == 2 and used[:5] == [used[0]] * 5 and used[5:] == [used[5]] * 4
    cached = [c for _, c in seen]
    assert all(c > 0 for c in cached[1:5]) and cached[5] == 0 and all(c > 0 for c in cached[6:])
    turns = status.affinity.turns
    assert turns.get("new") == 1 and turns.get("sticky") == 7
    moved = {name: n for name, n in turns.items() if name.startswith("moved")}
    assert sum(moved.values()) == 1, turns
    # Never a 429 upstream: routerd knew the window was spent from the headers.
    calls = mock.stats()["calls"]
    assert not any(
        status_code == "429" for per in calls.values() for m in per.values() for status_code in m
    )


async def test_many_conversations_spread_over_the_pool(
    mock_provider: MockFactory, daemon: DaemonFactory
) -> None:
    keys = keys_of(rpm=1000)
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=5))
    routerd = daemon(config(mock, keys), env=env_of(keys))
    where: dict[str, Counter[str]] = {}
    async with AsyncClient(str(routerd.socket_path)) as client:
        # A key proves itself with one call at a time first; here all have served before.
        for _ in range(8):
            await client.chat("main", messages=[{"role": "user", "content": "warm up"}])

        async def conversation(n: int) -> None:
            history: list[dict[str, Any]] = []
            for turn in range(3):
                history.append({"role": "user", "content": f"c{n} t{turn}"})
                result = await client.chat("main", messages=history, session=f"s{n}")
                history.append({"role": "assistant", "content": result.text})
                where.setdefault(f"s{n}", Counter())[result.credential] += 1

        async with anyio.create_task_group() as tg:
            for n in range(16):
                tg.start_soon(conversation, n)
        status = await client.status()
    # Each conversation stayed on one key, and the headroom strategy spread them.
    assert all(len(keys_used) == 1 for keys_used in where.values())
    held = [c.sessions for c in status.credentials]
    assert sum(held) == 16 and min(held) >= 2, held


def test_the_http_front_takes_the_conversation_from_a_header_or_the_body(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    keys = keys_of(rpm=1000)
    mock = mock_provider(MockSpec(keys=keys, models={"m1": ModelSpec()}, latency_ms=1))
    uds = short_dir / "http.sock"
    body = config(mock, keys)
    routerd = daemon(f'[server]\nhttp_socket = "{uds}"\n' + body, env=env_of(keys))
    chat = {"model": "main", "messages": [{"role": "user", "content": "hi"}]}
    anthropic = {
        "model": "main",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"user_id": "claude-session-1"},
    }
    transport = httpx.HTTPTransport(uds=str(uds))
    served: dict[str, set[str]] = {}
    with httpx.Client(transport=transport, base_url="http://routerd", timeout=30) as http:
        for _ in range(4):
            for name, path, payload, headers in (
                ("header", "/v1/chat/completions", chat, {"x-routerd-session": "conv-h"}),
                ("cache key", "/v1/chat/completions", {**chat, "prompt_cache_key": "pk"}, {}),
                ("user_id", "/v1/messages", anthropic, {}),
            ):
                reply = http.post(path, json=payload, headers=headers)
                assert reply.status_code == 200, reply.text
                served.setdefault(name, set()).add(reply.headers["x-routerd-credential"])
    with Client(str(routerd.socket_path)) as client:
        status = client.status()
    assert all(len(labels) == 1 for labels in served.values()), served
    assert status.affinity.turns == {"new": 3, "sticky": 9}

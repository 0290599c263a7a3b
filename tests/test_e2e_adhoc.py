"""Ad-hoc targets on the real daemon: requests naming thousands of provider/model targets.

What an operator notices: the daemon stays up and small (status, /metrics and the state
file do not grow with every name a client ever used), names unused for adhoc_idle_s
disappear, and past max_adhoc_targets a new name gets an error that says which setting
refused it, while the configured routes keep serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest
from routerd_client import AsyncClient, Client, Unavailable

from routerd import state as state_file
from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]

KEY = canary("main")
NAMES = 2000
CAP = 50
IDLE_S = 1.5


def config(mock: MockProcess, directory: Path, cap: int, idle_s: float) -> str:
    return f"""
[server]
http_socket = "{directory / "http.sock"}"
state_file = "{directory / "state.msgpack"}"
state_flush_s = 0.2
max_adhoc_targets = {cap}
adhoc_idle_s = {idle_s}

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "main", key_env = "KEY_MAIN" }}]

[routes.main]
chain = ["mock/m0"]
"""


@contextmanager
def http_front(directory: Path) -> Iterator[httpx.Client]:
    """Plain HTTP to the daemon's front over its Unix socket (no token needed there)."""
    transport = httpx.HTTPTransport(uds=str(directory / "http.sock"))
    with httpx.Client(transport=transport, base_url="http://routerd", timeout=30) as client:
        yield client


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def adhoc_targets(socket: Path) -> list[str]:
    """The targets `routerd status` lists beyond the configured one."""
    with Client(str(socket)) as client:
        return [t.target for t in client.status().targets if t.target != "mock/m0"]


async def name_each(socket: Path, names: list[str], concurrency: int) -> list[Exception]:
    """One request per name, ``concurrency`` at a time over one connection; the failures."""
    failures: list[Exception] = []
    pending = iter(names)
    async with AsyncClient(str(socket), name="adhoc") as client:

        async def worker() -> None:
            for name in pending:
                try:
                    await client.chat(name, messages=user("hi"), max_tokens=8)
                except Exception as exc:  # collected, so the test can say what failed
                    failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return failures


async def test_thousands_of_adhoc_names_keep_status_metrics_and_state_small(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    models = {f"m{i}": ModelSpec() for i in range(NAMES)}
    mock = mock_provider(MockSpec(keys={KEY: KeySpec("main")}, models=models, latency_ms=1))
    routerd = daemon(config(mock, short_dir, CAP, IDLE_S), env={"KEY_MAIN": KEY})

    failures = await name_each(routerd.socket_path, [f"mock/m{i}" for i in range(NAMES)], 16)
    assert failures == [], failures[:3]
    assert routerd.process.poll() is None

    # At most the cap are kept. Before, every name stayed: 2,000 names made a 233 KB
    # status, a 3.4 MB /metrics (0.9 s to scrape) and a 163 KB state file.
    with Client(str(routerd.socket_path)) as client:
        report = client.status()
    kept = [t.target for t in report.targets if t.target != "mock/m0"]
    assert 0 < len(kept) <= CAP
    assert len(msgspec.json.encode(report)) < 16 * 1024
    with http_front(short_dir) as http:
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert len(metrics.content) < 200 * 1024, len(metrics.content)

    # Unused for adhoc_idle_s, they go: from status, /metrics and the state file.
    await anyio.sleep(IDLE_S + 0.5)
    assert adhoc_targets(routerd.socket_path) == []
    with http_front(short_dir) as http:
        text = http.get("/metrics").text
    assert "mock/m1" not in text and 'target="mock/m0"' in text
    assert len(text) < 16 * 1024, len(text)
    with Client(str(routerd.socket_path)) as client:
        reply = client.chat("main", messages=user("still here"), max_tokens=8)
    assert reply.model == "m0"
    assert routerd.stop() == 0
    saved = state_file.load(short_dir / "state.msgpack")
    assert saved is not None
    assert [b.target for b in saved.breakers] == ["mock/m0"]


async def test_past_the_cap_a_new_name_is_refused_clearly_and_routes_keep_serving(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    cap = 4
    models = {f"m{i}": ModelSpec() for i in range(cap + 2)}
    mock = mock_provider(MockSpec(keys={KEY: KeySpec("main")}, models=models, latency_ms=1))
    routerd = daemon(config(mock, short_dir, cap, 600), env={"KEY_MAIN": KEY})
    socket = str(routerd.socket_path)

    async with AsyncClient(socket, name="holder") as holder, anyio.create_task_group() as tg:
        for i in range(1, cap + 1):
            # Each ad-hoc target has a request in flight, so none may make room.
            tg.start_soon(
                lambda n: holder.chat(f"mock/m{n}", messages=user("[[mock:sleep=3000]] hold")), i
            )
        with anyio.fail_after(10):
            while len(adhoc_targets(routerd.socket_path)) < cap:  # noqa: ASYNC110 - polls status
                await anyio.sleep(0.05)

        with Client(socket) as client:
            with pytest.raises(Unavailable) as caught:
                client.chat(f"mock/m{cap + 1}", messages=user("one too many"))
            assert f"server.max_adhoc_targets = {cap}" in caught.value.message
            assert caught.value.retry_after == 1.0
            # The configured route is not subject to the cap.
            assert client.chat("main", messages=user("configured"), max_tokens=8).model == "m0"
        # The HTTP front says the same, as a retryable 503.
        with http_front(short_dir) as http:
            body = {"model": f"mock/m{cap + 1}", "messages": user("one too many")}
            refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503
        assert "server.max_adhoc_targets" in json.loads(refused.text)["error"]["message"]

    # The held requests ended: the least recently used of them makes room.
    with Client(socket) as client:
        reply = client.chat(f"mock/m{cap + 1}", messages=user("now"), max_tokens=8)
    assert reply.model == f"m{cap + 1}"
    assert len(adhoc_targets(routerd.socket_path)) == cap
    assert routerd.process.poll() is None

"""Fair share on the real daemon: an agent with a big backlog does not starve another.

Two agent processes share a route whose only key takes one request at a time
(max_concurrent = 1). Agent A fires 500 requests at once; once most of them wait, agent B
fires 5. The daemon tells clients apart by their process, so each agent is a process of
its own; each prints when each of its requests completed (CLOCK_MONOTONIC is one clock
for the whole machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from routerd_client import Client

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

MockFactory = Callable[[MockSpec], MockProcess]

KEY = canary("one")
BACKLOG = 500
FEW = 5
LATENCY_MS = 15.0

# An agent: connects, says "ready", waits for a line on stdin, then sends ``count`` requests
# at once and prints the completion time of each, as JSON, once all are done.
AGENT = """
import json, sys, time
import anyio
from routerd_client import AsyncClient

socket, route, count, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

async def main() -> None:
    done = []
    async with AsyncClient(socket, name=tag) as client:
        print("ready", flush=True)
        sys.stdin.readline()

        async def one(n: int) -> None:
            await client.chat(route, messages=[{"role": "user", "content": f"{tag} {n}"}])
            done.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(one, n)
    print(json.dumps(done), flush=True)

anyio.run(main)
"""


class Agent:
    """An agent process, connected and waiting for ``go``."""

    def __init__(self, socket: Path, count: int, tag: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(socket), "fair", str(count), tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def go(self) -> float:
        """Let it send; returns when (monotonic) it was told to."""
        assert self.process.stdin is not None
        at = time.monotonic()
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return at

    async def completions(self) -> list[float]:
        """When each of its requests completed (it fails the test if any failed)."""
        out, _ = await anyio.to_thread.run_sync(lambda: self.process.communicate(timeout=50))
        assert self.process.returncode == 0, out
        done: list[float] = json.loads(out.strip().splitlines()[-1])
        return sorted(done)

    def kill(self) -> None:
        """Stop it, if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def waiting(socket: Path) -> int:
    """How many requests wait on route "fair", as `routerd status` shows."""
    with Client(str(socket)) as client:
        return next(r.waiting for r in client.status().routes if r.name == "fair")


async def test_an_agent_with_5_requests_is_served_among_one_with_500_queued(
    mock_provider: MockFactory, daemon: DaemonFactory, short_dir: Path
) -> None:
    mock = mock_provider(
        MockSpec(keys={KEY: KeySpec("one")}, models={"m1": ModelSpec()}, latency_ms=LATENCY_MS)
    )
    routerd = daemon(
        f"""
[server]
state_file = "{short_dir / "state.msgpack"}"

[providers.mock]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "one", key_env = "KEY_ONE", max_concurrent = 1 }}]

[routes.fair]
chain = ["mock/m1"]
deadline_s = 55
""",
        env={"KEY_ONE": KEY},
    )
    a = Agent(routerd.socket_path, BACKLOG, "A")
    b = Agent(routerd.socket_path, FEW, "B")
    try:
        a.go()
        with anyio.fail_after(20):
            while waiting(routerd.socket_path) < 0.8 * BACKLOG:  # noqa: ASYNC110 - polls status
                await anyio.sleep(0.02)
        b_sent = b.go()
        b_done = await b.completions()
        a_done = await a.completions()
    finally:
        a.kill()
        b.kill()

    assert len(a_done) == BACKLOG and len(b_done) == FEW
    a_before_b = sum(1 for t in a_done if t <= b_sent)
    a_during_b = sum(1 for t in a_done if b_sent < t <= b_done[-1])
    # Fair turns: B's five took about five of A's turns, not the 400-odd A had queued.
    assert a_during_b <= 0.05 * BACKLOG, (a_before_b, a_during_b)
    # So B was done before A's 15th percent, where first come, first served put it last.
    assert b_done[-1] < a_done[int(0.15 * BACKLOG) - 1], (a_before_b, a_during_b)

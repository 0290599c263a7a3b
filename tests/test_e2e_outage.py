"""A short outage under load on the real daemon: the route is back soon after the upstream is."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from routerd_client import AsyncClient, RouterdError

from routerd.mock import KeySpec, MockProcess, MockSpec, ModelSpec
from tests.conftest import DaemonFactory, canary

CONCURRENCY = 50
OPEN_S = 5.0
OUTAGE_S = 1.0
LATENCY_MS = 50.0
# The route must serve again within one probe interval of the upstream's recovery; a
# second of slack for a busy machine.
BACK_WITHIN_S = OPEN_S + 1.0
# How long the load keeps going after the outage, so that a late failure would be seen.
TAIL_S = BACK_WITHIN_S + 3.0


@dataclass
class Outcome:
    """One request: when it ended, and the error it got, if any."""

    ended: float
    error: RouterdError | None


@dataclass
class Load:
    """What the workers and the status poller saw."""

    warm_after: int
    outcomes: list[Outcome] = field(default_factory=list)
    successes: int = 0
    warm: anyio.Event = field(default_factory=anyio.Event)
    open_for: list[float] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)

    def add(self, error: RouterdError | None) -> None:
        self.outcomes.append(Outcome(time.monotonic(), error))
        if error is None:
            self.successes += 1
            if self.successes >= self.warm_after:
                self.warm.set()


def config(mock: MockProcess) -> str:
    return f"""
[breaker]
failure_threshold = 3
open_s = {OPEN_S}
max_open_s = 120.0

[providers.a]
kind = "openai-compatible"
base_url = "{mock.base_url}"
credentials = [{{ label = "only", key_env = "KEY_A" }}]

[routes.one]
chain = ["a/m"]
deadline_s = 20
"""


async def worker(socket: str, n: int, load: Load) -> None:
    async with AsyncClient(socket, name=f"agent-{n}") as client:
        while not load.stop.is_set():
            error = None
            try:
                await client.chat("one", messages=[{"role": "user", "content": f"hi {n}"}])
            except RouterdError as exc:
                error = exc
            load.add(error)


async def poll_breaker(socket: str, load: Load) -> None:
    async with AsyncClient(socket, name="status") as client:
        while not load.stop.is_set():
            report = await client.status()
            (target,) = report.targets
            load.open_for.append(target.open_for or 0.0)
            with anyio.move_on_after(0.1):
                await load.stop.wait()


async def test_one_second_of_503s_under_load_does_not_keep_the_route_down(
    mock_provider: Callable[[MockSpec], MockProcess], daemon: DaemonFactory
) -> None:
    key = canary("only")
    healthy = ModelSpec(latency_ms=LATENCY_MS)
    mock = mock_provider(MockSpec(keys={key: KeySpec("only")}, models={"m": healthy}))
    routerd = daemon(config(mock), env={"KEY_A": key})
    socket = str(routerd.socket_path)
    load = Load(warm_after=2 * CONCURRENCY)
    async with anyio.create_task_group() as tg:
        for n in range(CONCURRENCY):
            tg.start_soon(worker, socket, n, load)
        tg.start_soon(poll_breaker, socket, load)
        # Warm: the target has answered, so the breaker is closed and every worker is busy.
        with anyio.fail_after(20.0):
            await load.warm.wait()
        warm = len(load.outcomes)

        await anyio.to_thread.run_sync(mock.set_model, "m", ModelSpec(fault="503"))
        await anyio.sleep(OUTAGE_S)  # the outage itself, not a wait for something to happen
        # Taken before the mock heals, so the bounds below are if anything stricter.
        outage_ended = time.monotonic()
        await anyio.to_thread.run_sync(mock.set_model, "m", healthy)
        await anyio.sleep(TAIL_S)
        load.stop.set()

    during = load.outcomes[warm:]
    failures = [o for o in during if o.error is not None]
    late = [o for o in failures if o.ended > outage_ended + BACK_WITHIN_S]
    assert not late, (
        f"{len(late)} of {len(failures)} failures came more than {BACK_WITHIN_S} s after "
        f"the upstream recovered; the last: {late[-1].error}"
    )
    served_after = [o for o in during if o.error is None and o.ended > outage_ended]
    assert served_after, "the route never served again after the outage"
    first_served = min(o.ended for o in served_after) - outage_ended
    assert first_served <= BACK_WITHIN_S, first_served
    # Once back, it serves the whole load again.
    tail = [o for o in during if o.ended > outage_ended + BACK_WITHIN_S]
    assert len(tail) >= CONCURRENCY

    # One outage, one open period: the breaker never stayed open longer than open_s.
    assert load.open_for, "the status poller saw nothing"
    assert 0 < max(load.open_for) <= OPEN_S
    async with AsyncClient(socket) as client:
        (target,) = (await client.status()).targets
    assert target.breaker == "closed"
    assert target.consecutive_failures == 0
    # The dead upstream got the calls already in flight and the breaker's probes, no more.
    upstream_503 = mock.stats()["calls"]["only"]["m"].get("503", 0)
    assert 3 <= upstream_503 <= 2 * CONCURRENCY

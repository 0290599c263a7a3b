"""The tasks both fronts run their requests in: held until they end, cancelled and awaited
by the front when it stops, and a crash told, never a cancel."""

from __future__ import annotations

import asyncio

from routerd.fronts.tasks import RequestTasks
from tests.loops import both_loops  # noqa: F401 - the module's anyio_backend


async def test_tasks_are_held_until_they_end_and_a_crash_is_told() -> None:
    crashes: list[BaseException] = []
    tasks = RequestTasks(crashes.append)
    release = asyncio.Event()

    async def waits() -> None:
        await release.wait()

    async def crashes_once_released() -> None:
        await release.wait()
        raise ValueError("boom")

    tasks.spawn(waits())
    tasks.spawn(crashes_once_released())
    await asyncio.sleep(0)
    assert len(tasks) == 2
    release.set()
    await tasks.ended()
    assert len(tasks) == 0
    assert [repr(exc) for exc in crashes] == [repr(ValueError("boom"))]


async def test_cancel_ends_every_task_and_a_cancel_is_no_crash() -> None:
    crashes: list[BaseException] = []
    tasks = RequestTasks(crashes.append)
    cleaned: list[int] = []

    async def forever(n: int) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(n)

    for n in range(3):
        tasks.spawn(forever(n))
    await asyncio.sleep(0)
    tasks.cancel()
    await tasks.ended()
    assert sorted(cleaned) == [0, 1, 2]
    assert not tasks and not crashes


async def test_ended_waits_for_tasks_spawned_while_it_waits() -> None:
    tasks = RequestTasks()
    done: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        done.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        tasks.spawn(second())
        done.append("first")

    tasks.spawn(first())
    await tasks.ended()
    assert done == ["first", "second"]

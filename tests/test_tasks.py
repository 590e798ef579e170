"""Stopping background tasks: a task that swallows one cancellation still ends."""

from __future__ import annotations

import asyncio

from wsbroker.tasks import cancel_and_wait


async def test_a_loop_that_swallows_a_cancellation_is_stopped_anyway() -> None:
    swallowed = asyncio.Event()

    async def stubborn_loop() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as a library catching it mid-command would

    task = asyncio.ensure_future(stubborn_loop())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert swallowed.is_set() and task.cancelled()


async def test_a_finished_or_missing_task_is_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("already broken")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # its exception is retrieved, not raised
    await cancel_and_wait(None)

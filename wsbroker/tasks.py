"""Stopping a background task for sure.

``task.cancel()`` asks once, and code inside the task can swallow that one
request: redis-py does when the cancellation lands just as a command's reply
is handed over, and a ``while True`` loop around the command then runs on
forever, holding the shutdown (seen as a node that never exits after failing
to bind its port). Shutdown must not depend on luck, so it asks until the
task has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

ASK_AGAIN = 0.1
"""Seconds between two cancellation requests to a task that has not ended."""


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` (if any) and return once it has ended, whatever it swallowed.

    Its result or exception is retrieved and dropped: it was being stopped.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=ASK_AGAIN)
    if not task.cancelled():
        task.exception()

"""asyncio conventions shared by the daemon, the listeners and the outbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_INTERVAL = 1.0  # seconds a cancelled task gets to clean up before the next cancel
CANCEL_GRACE = 10.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], grace: float = CANCEL_GRACE
) -> set[asyncio.Task[Any]]:
    """Cancel the tasks and wait until they end; returns those still running after
    `grace` seconds (logged), so a shutdown always finishes.

    The cancellation is repeated while a task runs on: on Python 3.11,
    asyncio.wait_for() (which aiosmtplib uses) swallows a cancellation that arrives as
    its inner await completes (CPython gh-86296), and the task carries on as if it had
    never been cancelled, for instance into a long sleep.
    """
    every = list(tasks)
    pending = {task for task in every if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while pending and (left := deadline - loop.time()) > 0:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL, left))
    for task in every:  # retrieved here, so asyncio does not report them at exit
        if task.done() and not task.cancelled():
            task.exception()
    for task in pending:
        log.error("task %s did not end within %.0f s of its cancellation", task.get_name(), grace)
    return pending

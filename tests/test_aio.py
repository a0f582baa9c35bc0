"""cancel_and_wait: a shutdown ends even when a task swallows its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from localproxy import aio


async def swallows_first_cancel(log: list[str]) -> None:
    """What asyncio.wait_for does on Python 3.11 when the cancellation arrives as its
    inner await completes: the task goes on, here into a long sleep."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        log.append("swallowed")
    await asyncio.sleep(3600)


async def test_a_swallowed_cancellation_is_repeated(monkeypatch):
    monkeypatch.setattr(aio, "RECANCEL_INTERVAL", 0.05)
    log: list[str] = []
    task = asyncio.create_task(swallows_first_cancel(log))
    await asyncio.sleep(0)
    assert await aio.cancel_and_wait([task], grace=5) == set()
    assert log == ["swallowed"] and task.cancelled()


async def test_a_task_that_never_ends_is_reported_not_waited_for(caplog):
    stubborn_now = True

    async def stubborn() -> None:
        while stubborn_now:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="localproxy.aio"):
        assert await aio.cancel_and_wait([task], grace=0.2) == {task}
    assert "task stubborn did not end" in caplog.text
    stubborn_now = False
    assert await aio.cancel_and_wait([task], grace=1) == set()


async def test_finished_tasks_have_their_errors_retrieved(caplog):
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    sleeper = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    assert await aio.cancel_and_wait([failed, sleeper]) == set()
    assert sleeper.cancelled() and isinstance(failed.exception(), ValueError)

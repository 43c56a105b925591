"""Small asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio


def raise_lost_cancellation() -> None:
    """Ends a loop whose task was cancelled during a Redis command that swallowed the cancellation.

    redis-py's asyncio client does that now and then (a known class of bugs); a loop that catches the
    command's errors would then run on after its owner stopped and hang the event loop's shutdown.
    Long-running loops call this after each Redis round.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError

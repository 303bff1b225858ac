"""Work that a stop may cut short."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any


async def unless_set(stop: asyncio.Event, work: Awaitable[Any]) -> bool:
    """Run `work` unless `stop` is set first, which cancels it: False then (a call that hangs cannot hold
    up a stop). Its error, if it failed, is raised."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()
    return True

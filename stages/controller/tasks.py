"""Background tasks a controller starts and forgets (re-binds, polls, checkpoints).

Kept referenced until done (asyncio holds only weak references); a task that
fails is counted in the stage's errors and logged once; `cancel_all` ends them
all at close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError
from pipeline.stats import StageStats

if TYPE_CHECKING:
    from pipeline.api import Log


class Background:
    """The set of running background tasks of one controller."""

    def __init__(self, who: str, stats: StageStats, log: Log) -> None:
        self.who = who
        self.stats = stats
        self.log = log
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.stats.errors += 1
            self.log.error("%s: %s", self.who, exc if isinstance(exc, StageError) else repr(exc))

    async def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

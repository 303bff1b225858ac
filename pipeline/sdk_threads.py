"""The worker threads synchronous `videodb` SDK calls run in: daemon threads, so a hung call never holds up exit.

`asyncio.to_thread` uses the loop's default executor, and both `asyncio.run` and the
interpreter wait at exit for every call still running there: a VideoDB that stops
answering (a stop call at SIGTERM) held the exit for the SDK's 30 s timeout per call,
past any drain deadline. Work that must finish (a create's record) is awaited by
its caller within its own bound; anything still running when the process ends is
abandoned, like any other call a crash cuts short.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

#: As many calls at once as the default executor ran (the SDK's session pool and VideoDB's rate limits
#: are sized for a handful, not hundreds).
MAX_WORKERS = min(32, (os.cpu_count() or 1) + 4)


class DaemonPool:
    """A thread pool of daemon threads, started as work arrives (at most `workers`)."""

    def __init__(self, workers: int = MAX_WORKERS, name: str = "videodb-sdk") -> None:
        self.workers = workers
        self.name = name  # of its threads, numbered
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._queue.put((fut, fn))
        if self._idle.acquire(blocking=False):  # a worker is waiting: it takes it
            return fut
        with self._lock:
            if self._threads < self.workers:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            fut, fn = self._queue.get()
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            del fut, fn
            self._idle.release()


_pool = DaemonPool()


def _after_fork() -> None:
    """A forked child has none of the parent's workers (its count would stop new ones starting): a new pool."""
    global _pool
    _pool = DaemonPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def submit(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """`fn(*args, **kwargs)` queued for a daemon worker thread (with the caller's context variables). A worker
    busy with a call counts as busy until the call returns, however long; one cancelled before a worker took
    it never runs."""
    ctx = contextvars.copy_context()
    return _pool.submit(functools.partial(ctx.run, fn, *args, **kwargs))


def workers() -> int:
    """How many worker threads run calls at most."""
    return _pool.workers


async def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a daemon worker thread (with this task's context variables)."""
    return await asyncio.wrap_future(submit(fn, *args, **kwargs))

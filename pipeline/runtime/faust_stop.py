"""Bounded worker shutdown: a batch still at the sinks when `drain_timeout` ends is given up, unacknowledged.

Why: on SIGTERM faust waits, without end, until every record it handed the agent
is acknowledged, so one stalled sink (a webhook that never answers) kept a worker
from stopping. The batch given up is not acknowledged and its state never reached
the changelog: the worker that takes its partition processes it again (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("pipeline.runtime.faust")


class DrainClock:
    """Knows the agent task while it handles a batch; once shutdown began, cancels it after `timeout` s."""

    __slots__ = ("_timer", "gave_up", "task", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.task: asyncio.Task[Any] | None = None  # the task handling a batch, while it does
        self.gave_up = False
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def holding(self, task: asyncio.Task[Any]) -> Iterator[None]:
        """While `task` handles one batch (its sinks included)."""
        self.task = task
        try:
            yield
        finally:
            self.task = None

    def start(self) -> None:
        """Shutdown began: the batch in hand, if any, has `timeout` seconds from now."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        self.gave_up = True
        log.warning("worker %d: a batch was still at the sinks after drain_timeout=%gs; stopping without it "
                    "(not acknowledged: the worker that takes its partition processes it again)",
                    os.getpid(), self.timeout)
        task.cancel()



def give_up(consumer: Any, events: list[Any]) -> None:
    """Stop faust waiting for these records at shutdown, without acknowledging them (offsets stay put).

    Each is also marked acknowledged, though its offset is not: an acknowledgement faust makes later is then
    a no-op. Why: `take_events` (`batch_wait` above 0) acknowledges its batch in a `finally`, which ran as the
    worker stopped, and the batch given up after `drain_timeout`, or one a sink failed, had its offsets
    committed: the next worker never delivered it."""
    unacked = getattr(consumer, "_unacked_messages", None)  # faust's set of records handed out, not acked
    for event in events:
        event.message.acked = True
        if unacked is not None:
            unacked.discard(event.message)


class StopCommits:
    """At shutdown, an offset commit waits at most `timeout` s; once one did not finish, no commit waits again.

    Why: aiokafka retries a commit without end while it cannot reach the group coordinator, so a worker
    whose broker was gone never stopped on SIGTERM (faust commits as it waits for its streams, and again
    as its consumer stops). What was not committed is delivered again to the next worker (at-least-once).
    """

    __slots__ = ("failed", "stopping", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.stopping = False  # set once shutdown began
        self.failed = False  # a commit at shutdown did not finish within `timeout`


def bounded_at_stop(consumer: type[Any], commits: StopCommits) -> type[Any]:
    """`consumer` (a faust Consumer class) whose commits at shutdown are bounded by `commits`."""

    class Consumer(consumer):  # type: ignore[misc,valid-type]
        async def commit(self, *args: Any, **kwargs: Any) -> bool:
            if not commits.stopping:
                return bool(await super().commit(*args, **kwargs))
            if commits.failed:
                return False
            try:
                return bool(await asyncio.wait_for(super().commit(*args, **kwargs), commits.timeout))
            except TimeoutError:
                commits.failed = True
                log.warning("worker %d: offsets not committed within %gs at stop", os.getpid(), commits.timeout)
                return False

        def _new_consumer_thread(self) -> Any:
            thread = super()._new_consumer_thread()
            thread.on_thread_stop = _bounded(thread.on_thread_stop, commits.timeout)
            return thread

    return Consumer


def _bounded(stop: Callable[[], Awaitable[None]], timeout: float) -> Callable[[], Awaitable[None]]:
    """The consumer thread's stop (aiokafka's consumer close), given `timeout` s and never raising.

    Why: with the broker gone, aiokafka's close re-raised the cancellation of a fetch waiting to retry,
    so the thread never said it had stopped, and the worker waited for it without end."""

    async def on_thread_stop() -> None:
        try:
            await asyncio.wait_for(stop(), timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the stop itself was cancelled, not just aiokafka's fetch
            log.warning("worker %d: Kafka consumer did not close cleanly", os.getpid())
        except TimeoutError:
            log.warning("worker %d: Kafka consumer did not close within %gs", os.getpid(), timeout)
        except Exception as exc:
            log.warning("worker %d: Kafka consumer did not close cleanly (%s)", os.getpid(), type(exc).__name__)

    return on_thread_stop


def bounded_producer(producer: type[Any], commits: StopCommits) -> type[Any]:
    """`producer` (a faust Producer class) whose stop waits at most `commits.timeout` s for unsent records.

    Why: aiokafka's producer, as it stops, waits for every record still to send, for up to its request
    timeout (20 minutes under faust) when the broker is gone."""

    class Producer(producer):  # type: ignore[misc,valid-type]
        async def on_stop(self) -> None:
            try:
                await asyncio.wait_for(super().on_stop(), commits.timeout)
            except TimeoutError:
                log.warning("worker %d: Kafka producer did not close within %gs", os.getpid(), commits.timeout)

    return Producer


def one_line_abandoned_request(record: logging.LogRecord) -> None:
    """asyncio's "Task exception was never retrieved" for an aiokafka request, made one warning line.

    Why: a commit given up at stop (a paused broker keeps its connection open and answers nothing) leaves the
    request aiokafka shields running; it fails as the consumer closes, and asyncio logged a 15-line traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if record.name != "asyncio" or exc is None or not type(exc).__module__.startswith("aiokafka"):
        return
    record.exc_info, record.exc_text = None, None
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    record.msg, record.args = "worker %d: an abandoned Kafka request failed: %s: %s", (os.getpid(), type(exc).__name__,
                                                                                      exc)

"""One webhook destination: a bounded queue, the rate limit, digest folding and N concurrent senders.

`put` is all the hot path sees: it returns as soon as the alerts are queued
and waits only when the queue is full (backpressure). A dispatcher task takes
alerts off the queue, spends rate-limit tokens and starts sender tasks. With
`on_limit: digest`, alerts arriving while the bucket is empty are held and go
out together as one digest when the next token arrives; the number held is
bounded, after which the queue (and then ingest) waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.events import Event

from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from pipeline.api import Log


@dataclass(frozen=True, slots=True)
class Alert:
    """An event to forward and its idempotency key."""

    event: Event
    key: str
    size: int = 0  # encoded size, for the queue's byte bound


Send = Callable[[list[Alert]], Awaitable[None]]
"""Delivers one message (one alert, or a digest when several) and records the outcome."""
Abandon = Callable[[list[Alert], str], None]
"""Dead-letters alerts that could not be attempted, with the reason."""
Fit = Callable[[list[Alert]], int]
"""How many of the oldest alerts (at least 1) one digest's body can carry."""


class Destination:
    """Queue and schedule alerts for one URL; never loses an alert without calling `abandon`."""

    def __init__(self, label: str, send: Send, abandon: Abandon, *, queue_size: int, concurrency: int,
                 bucket: TokenBucket | None, digest: bool, digest_max: int, log: Log,
                 queue_bytes: int = 16 << 20, fit: Fit | None = None) -> None:
        self.label = label
        self._send = send
        self._abandon = abandon
        self._queue: asyncio.Queue[Alert | None] = asyncio.Queue(queue_size)
        self._max_bytes = queue_bytes
        self._bytes = 0  # alerts queued, held or being sent
        self._freed = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._bucket = bucket
        self._digest = digest and bucket is not None
        self._digest_max = digest_max
        self._fit = fit
        self._log = log
        self._held: list[Alert] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._since: dict[int, float] = {}  # id of each alert queued, held or being sent -> when it was queued
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def queued(self) -> int:
        """Alerts waiting in the queue or held for a digest (not yet being sent)."""
        return self._queue.qsize() + len(self._held)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"alert_forwarder {self.label}")

    async def put(self, alerts: list[Alert]) -> None:
        """Queue alerts; waits only while the queue is full."""
        if self._closed:
            raise RuntimeError(f"alert_forwarder {self.label}: write after close")
        for n, alert in enumerate(alerts):
            try:
                while self._bytes and self._bytes + alert.size > self._max_bytes:
                    self._check_alive()
                    self._freed.clear()
                    await self._freed.wait()
            except asyncio.CancelledError:
                self.abandon(alerts[n:])
                raise
            try:
                self._queue.put_nowait(alert)
            except asyncio.QueueFull:
                self._check_alive()
                try:
                    await self._queue.put(alert)
                except asyncio.CancelledError:  # shutdown gave up waiting: the rest is dead-lettered, not lost
                    self.abandon(alerts[n:])
                    raise
            self._since[id(alert)] = time.monotonic()
            self._bytes += alert.size
            self._idle.clear()

    def abandon(self, alerts: list[Alert]) -> None:
        """Dead-letter alerts this destination never queued (a write cancelled at shutdown)."""
        self._abandon(alerts, "shutdown: not queued before drain_timeout")

    async def flush(self) -> None:
        """Wait until every alert queued so far is delivered or dead-lettered."""
        while self._since:
            self._check_alive()
            await self._idle.wait()

    def holding_since(self) -> float | None:
        """When the oldest alert not yet delivered or dead-lettered was queued; None when none is."""
        return min(self._since.values(), default=None)

    def _settled(self, alerts: list[Alert]) -> None:
        for a in alerts:
            self._since.pop(id(a), None)
        self._bytes -= sum(a.size for a in alerts)
        self._freed.set()
        if not self._since:
            self._idle.set()

    def _check_alive(self) -> None:
        if self._task is None or self._task.done():
            raise RuntimeError(f"alert_forwarder {self.label}: dispatcher is not running")

    async def drain(self) -> None:
        """Send everything queued (honouring the rate limit), then stop. Bound it with a timeout."""
        await self._queue.put(None)
        if self._task is not None:
            await asyncio.shield(self._task)

    async def abort(self, reason: str) -> None:
        """Stop now: cancel senders (they dead-letter their alerts) and dead-letter all still queued."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._senders):
            task.cancel()
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        left = self._held
        self._held = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                left.append(item)
        if left:
            self._abandon(left, reason)
            self._settled(left)

    async def _run(self) -> None:
        stopping = False
        while True:
            if self._held:
                if not self._digest:
                    if self._bucket is not None:
                        await self._bucket.acquire()
                    await self._launch()
                    continue
                assert self._bucket is not None
                wait = self._bucket.delay()
                if wait <= 0 and self._bucket.take():
                    await self._launch()
                    continue
                if stopping or len(self._held) >= self._digest_max:
                    await asyncio.sleep(wait)
                    continue
                try:
                    item = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    continue
            elif stopping:
                break
            else:
                item = await self._queue.get()
            if item is None:
                stopping = True
            else:
                self._held.append(item)
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)

    async def _launch(self) -> None:
        """Hand the held alerts (those one digest fits; the rest wait, in order) to a sender once a slot is free."""
        await self._slots.acquire()
        n = len(self._held)
        if n > 1 and self._fit is not None:
            n = max(1, min(n, self._fit(self._held)))
        alerts, self._held = self._held[:n], self._held[n:]
        task = asyncio.create_task(self._deliver(alerts))
        self._senders.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._senders.discard(task)
        self._slots.release()

    async def _deliver(self, alerts: list[Alert]) -> None:
        try:
            await self._send(alerts)
        except asyncio.CancelledError:
            self._abandon(alerts, "shutdown: delivery still in progress when shutdown_timeout expired")
            raise
        except Exception as exc:
            self._log.exception("alert_forwarder %s: unexpected error while sending", self.label)
            self._abandon(alerts, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._settled(alerts)

"""Source `websocket`: any server that sends VideoDB's JSON messages over a WebSocket.

Frames are read by one task into a list; `batches()` yields whatever has
arrived since the last batch, so batching adds no latency. Non-JSON frames,
JSON that is not an object and oversized frames go to the dead-letter file.
Drops reconnect with exponential backoff. Subclasses (the `videodb` source)
override `open()` to obtain the socket another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson
from pydantic import Field

from pipeline.api import Batch, Context, Options, Source
from pipeline.backoff import Backoff
from pipeline.errors import StageError
from pipeline.events import Stamper, edge_reason
from pipeline.types import Duration

log = logging.getLogger("pipeline.source.websocket")
STABLE_AFTER = 10.0  # seconds a connection must last before a drop reconnects without backoff
PENDING_BYTES = 32 << 20  # raw frame bytes read ahead of the pipeline before the reader waits


async def raw_frames(ws: Any) -> AsyncIterator[bytes]:
    """Every message as bytes, text frames undecoded: invalid UTF-8 is then dead-lettered, not a close (1007)."""
    import websockets

    while True:
        try:
            yield await ws.recv(decode=False)
        except websockets.ConnectionClosedOK:
            return


class ReaderOptions(Options):
    """What every WebSocket-reading source accepts (`websocket`, `videodb`)."""

    max_message_bytes: int = Field(default=1 << 20, ge=1, description="larger frames are dead-lettered")
    backoff_initial: Duration = Field(default=1.0, description="first reconnect delay; doubles per failure")
    backoff_max: Duration = Field(default=60.0, description="longest reconnect delay")
    max_retries: int | None = Field(default=None, ge=0, description="give up after N failed reconnects")
    batch_max: int = Field(default=1024, ge=1, description="most events per yielded batch")


class WebSocketOptions(ReaderOptions):
    url: str = Field(description="ws:// or wss:// URL (TLS certificates are verified)")


class WebSocketSource(Source):
    """Reads JSON messages from a WebSocket, stamps them and yields batches."""

    name = "websocket"
    Options: ClassVar[type[ReaderOptions]] = WebSocketOptions

    def __init__(self, options: Any, context: Context) -> None:
        super().__init__(options, context)
        self._pending: list[Any] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()  # cleared while `_pending` is full: the reader stops reading (backpressure)
        self._room.set()
        self._limit = 4 * options.batch_max
        self._pending_bytes = 0  # raw frame bytes in `_pending`: the reader also stops at PENDING_BYTES
        self.batch_bytes = 0  # raw bytes of the batch just yielded (the runtime bounds queues by bytes)
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._done = False
        self._ws: Any = None
        self._stamp = Stamper()
        self.connection_id: str | None = None

    async def open(self) -> tuple[Any, str | None]:
        """Connect; returns (websockets connection, connection id or None)."""
        import websockets

        ws = await websockets.connect(self.options.url, max_size=None, close_timeout=1)
        first = await ws.recv(decode=False)
        conn_id = None
        try:
            msg = orjson.loads(first)
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict) and set(msg) <= {"connection_id", "type", "status"} and "connection_id" in msg:
            conn_id = str(msg["connection_id"])
        else:
            self._accept(first)
        return ws, conn_id

    def describe(self) -> str:
        return self.options.url

    def _accept(self, frame: str | bytes) -> None:
        """Parse one frame into the pending list, or dead-letter it with the reason."""
        size = len(frame)
        if size > self.options.max_message_bytes:
            self._reject(f"frame of {size} bytes exceeds max_message_bytes={self.options.max_message_bytes}",
                         frame[:1024])
            return
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            self._reject(f"not JSON: {exc}", frame)
            return
        if not isinstance(event, dict):
            self._reject(f"JSON {type(event).__name__}, not an object", frame)
            return
        reason = edge_reason(frame, event)
        if reason is not None:
            self._reject(reason, frame)
            return
        self._pending.append(self._stamp(event))
        self._pending_bytes += size
        if len(self._pending) == 1:
            self._ready.set()

    def _reject(self, reason: str, frame: str | bytes) -> None:
        self.context.stats.dropped += 1
        self.context.dead_letter.write(reason, stage=self.context.stage,
                                       origin={"source": self.describe(), "connection_id": self.connection_id},
                                       raw=frame)

    async def _read_loop(self) -> None:
        import websockets

        backoff = Backoff(self.options.backoff_initial, self.options.backoff_max,
                          max_retries=self.options.max_retries)
        try:
            while not self._stopping:
                try:
                    self._ws, conn_id = await self.open()
                except (TimeoutError, OSError, websockets.WebSocketException, StageError) as exc:
                    delay = backoff.next()
                    if delay is None:
                        raise StageError(f"{self.describe()}: gave up after {backoff.attempt} reconnect attempts: "
                                         f"{exc}") from None
                    log.warning("%s: connect failed (%s); retry %d in %.1fs", self.describe(), exc,
                                backoff.attempt, delay)
                    await self._pause(delay)
                    continue
                connected_at = time.monotonic()
                self.connection_id = conn_id
                log.info("%s: connected%s", self.describe(), f" (connection id {conn_id})" if conn_id else "")
                if conn_id:
                    await self.context.session.announce_connection(conn_id)
                reason = "closed by the server"
                try:
                    async for frame in raw_frames(self._ws):
                        self._accept(frame)
                        if len(self._pending) >= self._limit or self._pending_bytes >= PENDING_BYTES:
                            self._room.clear()
                            await self._room.wait()
                except websockets.ConnectionClosed as exc:
                    reason = str(exc)
                finally:
                    await self._ws.close()
                if self._stopping:
                    break
                if time.monotonic() - connected_at >= STABLE_AFTER:
                    backoff.reset()  # it was up for a while: reconnect at once
                    log.warning("%s: connection dropped (%s); reconnecting", self.describe(), reason)
                    continue
                delay = backoff.next()  # dropped soon after connecting: don't hammer a flapping server
                if delay is None:
                    raise StageError(f"{self.describe()}: gave up after {backoff.attempt} reconnect attempts: "
                                     f"connection keeps dropping ({reason})")
                log.warning("%s: connection dropped (%s); reconnecting in %.1fs", self.describe(), reason, delay)
                await self._pause(delay)
        finally:
            self._done = True
            self._ready.set()

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if stop() is called."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except TimeoutError:
            pass

    async def batches(self) -> AsyncIterator[Batch]:
        reader = asyncio.create_task(self._read_loop(), name=f"{self.context.stage}-reader")
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._pending:
                    batch = self._pending[: self.options.batch_max]
                    self.batch_bytes = self._pending_bytes * len(batch) // len(self._pending)
                    self._pending_bytes -= self.batch_bytes
                    del self._pending[: self.options.batch_max]
                    if len(self._pending) < self._limit and self._pending_bytes < PENDING_BYTES:
                        self._room.set()
                    yield batch
                if self._done or self._stopping:
                    break  # stopping: what was received is yielded; a reader still connecting is cancelled
            if self._done:
                await reader  # surfaces a StageError from the reader
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def stop(self) -> None:
        self._stopping = True
        self._stop_event.set()
        self._room.set()
        if self._ws is not None:
            await self._ws.close()
        self._ready.set()

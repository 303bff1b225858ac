"""Source `websocket`: any server that sends VideoDB's JSON messages over a WebSocket.

Frames are read by one task into a list; `batches()` yields whatever has
arrived since the last batch, so batching adds no latency. Non-JSON frames,
JSON that is not an object and oversized frames go to the dead-letter file;
a message over 4 x max_message_bytes is not even read: the connection is
closed (1009), one dead-letter line says so, and the source reconnects.
A connection that delivered at least one event is reopened at once when it
drops (each gap is logged with its length); failed connects and connections
that delivered nothing back off exponentially (a quiet one that stayed open
longer than `backoff_max` restarts the backoff: it was working). Subclasses (the `videodb`
source) override `open()` to obtain the socket another way, and may set an
`Inlet` (inlet.py) whose backfilled batches are yielded like live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, ClassVar

import orjson
from pydantic import Field

from pipeline.api import Batch, Context, Options, Source
from pipeline.backoff import Backoff
from pipeline.cancel import unless_set
from pipeline.errors import StageError
from pipeline.events import Stamper, edge_reason
from pipeline.types import Duration
from stages.sources.inlet import Inlet

log = logging.getLogger("pipeline.source.websocket")
BACKFILL_EVENT_BYTES = 512  # size counted per backfilled event (they arrive parsed, not as frames)
PENDING_BYTES = 32 << 20  # raw frame bytes read ahead of the pipeline before the reader waits
#: Messages up to this many times max_message_bytes are read and dead-lettered; a longer one closes the
#: connection (1009) as soon as its length is known, so a peer cannot make us hold a message of any size.
READ_LIMIT_FACTOR = 4


def read_limit(max_message_bytes: int) -> int:
    """Largest message the WebSocket library may assemble for us (bounds memory, peer-controlled)."""
    return READ_LIMIT_FACTOR * max_message_bytes


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
    #: 0 (either) reconnected with no delay at all while the server was down: a busy loop of connects
    backoff_initial: Duration = Field(default=1.0, gt=0, description="first reconnect delay; doubles per failure")
    backoff_max: Duration = Field(default=60.0, gt=0, description="longest reconnect delay")
    max_retries: int | None = Field(default=None, ge=0, description="give up after N failed reconnects")
    batch_max: int = Field(default=1024, ge=1, description="most events per yielded batch")
    keepalive: Duration = Field(default=20.0, gt=0, description="ping this often; a peer that does not "
                                "answer within as long again is taken for gone and the source reconnects")


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
        self._stamp = Stamper(keep=False)  # receipt is ours: a peer's ts/unix_ts are replaced
        self._inlet: Inlet | None = None  # backfilled events enter here (videodb source)
        self._reading = False  # connected and reading frames: a stop reads on until the server answers its close
        #: at stop, how long the close handshake may take: frames the server sent before it saw our close are
        #: still read (behind a slow sink that takes as long as the sinks are given: drain_timeout)
        self._close_timeout = max(1.0, float(context.settings.get("drain_timeout", 30.0)))
        self._accepted = 0  # events accepted so far (a connection that delivered some reconnects at once)
        self.connection_id: str | None = None

    async def open(self) -> tuple[Any, str | None]:
        """Connect; returns (websockets connection, connection id or None)."""
        import websockets

        ws = await websockets.connect(self.options.url, max_size=read_limit(self.options.max_message_bytes),
                                      close_timeout=1, ping_interval=self.options.keepalive,
                                      ping_timeout=self.options.keepalive)
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
        self._accepted += 1
        self._pending_bytes += size
        if len(self._pending) == 1:
            self._ready.set()

    def _reject(self, reason: str, frame: str | bytes) -> None:
        """Dead-letter a refused frame: its first 4 KiB, as for a bad replay line or Kafka record (whole, a peer
        flooding large bad frames filled the disk at the speed of the connection)."""
        self.context.stats.dropped += 1
        self.context.dead_letter.write(reason, stage=self.context.stage,
                                       origin={"source": self.describe(), "connection_id": self.connection_id},
                                       raw=frame[:4096])

    async def _read_loop(self) -> None:
        import websockets

        backoff = Backoff(self.options.backoff_initial, self.options.backoff_max,
                          max_retries=self.options.max_retries)
        gaps = self.context.session.gaps
        dropped_at: float | None = None  # monotonic time the last connection dropped (None: connected)
        try:
            while not self._stopping:
                accepted_before = self._accepted
                opening = time.monotonic()
                try:
                    self._ws, conn_id = await self.open()
                except (TimeoutError, OSError, websockets.WebSocketException, StageError) as exc:
                    if isinstance(exc, websockets.ConnectionClosed) and \
                            time.monotonic() - opening >= self.options.backoff_max:
                        backoff.reset()  # connected, then quiet for long before its first frame: it was working
                    delay = backoff.next()
                    if delay is None:
                        raise StageError(f"{self.describe()}: gave up after {backoff.attempt} reconnect attempts: "
                                         f"{exc}") from None
                    log.warning("%s: connect failed (%s); retry %d in %.1fs", self.describe(), exc,
                                backoff.attempt, delay)
                    await self._pause(delay)
                    continue
                self.connection_id = conn_id
                shown = f" (connection id {conn_id})" if conn_id else ""
                if dropped_at is None:
                    log.info("%s: connected%s", self.describe(), shown)
                else:
                    gap = gaps.end_outage()
                    gaps.reconnects += 1
                    log.warning("%s: reconnected%s after a %.3fs gap", self.describe(), shown, gap)
                dropped_at = None
                opened_at = time.monotonic()
                self._ws.ping_interval = self._ws.ping_timeout = self.options.keepalive
                if conn_id:
                    await self.context.session.announce_connection(conn_id)
                reason = "closed by the server"
                self._reading = True
                try:
                    async for frame in raw_frames(self._ws):
                        self._accept(frame)
                        if len(self._pending) >= self._limit or self._pending_bytes >= PENDING_BYTES:
                            self._room.clear()
                            await self._wait_for_room()
                except websockets.ConnectionClosed as exc:
                    reason = str(exc)
                    if exc.sent is not None and exc.sent.code == 1009:  # the library refused a huge message
                        limit = read_limit(self.options.max_message_bytes)
                        self._reject(f"message larger than {limit} bytes (4 x max_message_bytes): not read; "
                                     "connection closed (1009) and reopened", b"")
                finally:
                    self._reading = False
                    await self._ws.close()
                if self._stopping:
                    break
                if self._inlet is not None:
                    self._inlet.mark_gap(self._pending)  # a backfill resumes from here
                dropped_at = gaps.down_since = time.monotonic()  # live views count the outage as it lasts
                if delivered := self._accepted - accepted_before:
                    backoff.reset()  # it was working: every second away is lost events, reconnect at once
                    log.warning("%s: connection dropped after %d events (%s); reconnecting now",
                                self.describe(), delivered, reason)
                    continue
                if dropped_at - opened_at >= self.options.backoff_max:
                    backoff.reset()  # quiet but up for long: a working connection, not a failed reconnect
                delay = backoff.next()  # delivered nothing: don't hammer a server that accepts and drops
                if delay is None:
                    raise StageError(f"{self.describe()}: gave up after {backoff.attempt} reconnect attempts: "
                                     f"connection keeps dropping ({reason})")
                log.warning("%s: connection dropped (%s); reconnecting in %.1fs", self.describe(), reason, delay)
                await self._pause(delay)
        finally:
            if gaps.down_since is not None:  # stopped while disconnected: that outage counts too
                gaps.end_outage()
            self._done = True
            self._ready.set()

    async def _wait_for_room(self) -> None:
        """Backpressure: stop reading until the pipeline took some events.

        The server's answers to our keepalive pings wait behind the frames we are not reading, so the
        ping timeout is off meanwhile: a stalled sink must not make us drop the connection (and every
        frame in our socket buffers with it).
        """
        ws = self._ws
        timeout = ws.ping_timeout
        ws.ping_timeout = None
        try:
            await self._room.wait()
        finally:
            ws.ping_timeout = timeout

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
                if self._inlet is not None and self._inlet.hold_from is not None:
                    with contextlib.suppress(TimeoutError):  # a hold ends by release() or by timing out
                        await asyncio.wait_for(self._ready.wait(), 0.25)
                else:
                    await self._ready.wait()
                self._ready.clear()
                while self._pending or (self._inlet is not None and self._inlet.queued):
                    if self._inlet is not None and (filled := self._inlet.take()) is not None:
                        batch = self._inlet.admit([self._stamp(e) for e in filled])
                        self.batch_bytes = BACKFILL_EVENT_BYTES * len(batch)
                    else:
                        n = self.options.batch_max
                        if self._inlet is not None and not self._stopping:
                            n = min(n, self._inlet.releasable(len(self._pending)))
                            if n == 0:
                                break  # the new connection's events wait for the backfill
                        batch = self._pending[:n]
                        self.batch_bytes = self._pending_bytes * len(batch) // len(self._pending)
                        self._pending_bytes -= self.batch_bytes
                        del self._pending[:n]
                        if len(self._pending) < self._limit and self._pending_bytes < PENDING_BYTES:
                            self._room.set()
                        if self._inlet is not None:
                            batch = self._inlet.admit(batch)
                    if batch:
                        yield batch
                if self._done or (self._stopping and not self._reading):
                    break  # stopping: yielded up to the server's close answer; a reader still connecting is cancelled
            if self._done:
                await reader  # surfaces a StageError from the reader
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            self._drop_unyielded()

    def _drop_unyielded(self) -> None:
        """Events accepted but never yielded (held for a backfill when the reader gave up, or the source cancelled
        at the end of drain_timeout): dead-lettered, so nothing accepted vanishes."""
        left = self._pending
        while self._inlet is not None and (filled := self._inlet.take()) is not None:
            left.extend(filled)
        self._pending, self._pending_bytes = [], 0
        for event in left:
            self.context.stats.dropped += 1
            self.context.dead_letter.write("accepted but not passed on before the source stopped",
                                           stage=self.context.stage,
                                           origin={"source": self.describe(), "connection_id": self.connection_id},
                                           event=event)

    async def unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work` unless stop() comes first, which cancels it: False then (a call that hangs cannot hold up
        a stop)."""
        return await unless_set(self._stop_event, work)

    async def stop(self) -> None:
        """Send our close; frames the server sent before it saw it are still read and yielded."""
        self._stopping = True
        self._stop_event.set()
        self._room.set()
        if self._ws is not None:
            # Only a stop waits this long for the close handshake: a server that stopped answering our keepalive
            # pings is given 1 s, else the reconnect waited drain_timeout (30 s) more for its close frame.
            self._ws.close_timeout = self._close_timeout
            await self._ws.close()
        self._ready.set()

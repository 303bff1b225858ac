"""Source `videodb`: the capture-session event stream, connected through the real SDK.

`conn.connect_websocket(collection_id)` then `await ws.connect()` (the SDK reads
the connection id from the first message); after that we read raw frames from
the SDK's underlying websockets connection, so garbage is dead-lettered with
its reason instead of becoming `{"raw": ...}`. Reconnect, batching, stamping
and dead-lettering come from the `websocket` source; each (re)connect
announces the new connection id on `context.session` so the controller can
re-bind the session's AI pipelines to it.

With `backfill: true` (default) the source also owns the `Inlet` the
controller fills after each re-bind with what VideoDB produced during the gap
(stages/sources/backfill.py); those events are yielded as ordinary batches,
each marked `"backfill": true`, deduplicated against what arrived live.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipeline.api import Batch, Context
from pipeline.errors import StageError
from pipeline.files import check_writable, ensure_private_dir, write_private_text
from pipeline.net import VIDEODB_URL_EXAMPLE, http_url
from pipeline.types import Secret
from pipeline.videodb_sdk import VideoDBCallError, VideoDBSettings, call, connect
from stages.sources.inlet import Inlet
from stages.sources.websocket import ReaderOptions, WebSocketSource, read_limit

log = logging.getLogger("pipeline.source.videodb")

WS_ID_FILE = "videodb_ws_id"
PID_FILE = "videodb_ws_pid"


class VideoDBSourceOptions(ReaderOptions):
    api_key: Secret | None = Field(default=None, description="overrides videodb.api_key")
    base_url: str | None = Field(default=None, description="overrides videodb.base_url")
    collection_id: str | None = Field(default=None, description="overrides videodb.collection_id")
    state_dir: str | None = Field(default=None, description="write videodb_ws_id / videodb_ws_pid here "
                                                            "(default: the pipeline's state_dir)")
    backfill: bool = Field(default=True, description="after a reconnect, fetch what VideoDB produced during "
                                                     "the gap (needs the capture_session controller)")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        return None if v is None else http_url(v, VIDEODB_URL_EXAMPLE)


class VideoDBSource(WebSocketSource):
    """Events from VideoDB's WebSocket via `videodb.connect().connect_websocket()`."""

    name = "videodb"
    Options = VideoDBSourceOptions

    def __init__(self, options: Any, context: Context) -> None:
        super().__init__(options, context)
        self.settings = VideoDBSettings.resolve(context.settings, api_key=options.api_key,
                                                base_url=options.base_url,
                                                collection_id=options.collection_id)
        self.state_dir: Path = Path(options.state_dir or context.state_dir).expanduser()
        self._conn: Any = None
        self._first: Any = None  # the preflight's result (WebSocketConnection or retryable error), for open()
        if options.backfill:
            self._inlet = Inlet(self._ready.set, context.session.gaps.backfilled, chunk=options.batch_max,
                                position=lambda: self._accepted)
            context.session.inlet = self._inlet

    def describe(self) -> str:
        return f"videodb {self.settings.base_url or 'api.videodb.io'} collection {self.settings.collection_id}"

    async def _sdk(self, what: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await call(self.context.stage, what, fn, *args, api_key=self.settings.api_key, **kwargs)

    async def _preflight(self) -> None:
        """Fail fast on what retrying cannot fix (no key, bad key, bad collection); write the pid file."""
        ensure_private_dir(self.state_dir)
        write_private_text(self.state_dir / PID_FILE, str(os.getpid()))
        check_writable(self.state_dir / WS_ID_FILE)  # a symlink there fails once now, not every reconnect
        self._conn = await asyncio.to_thread(connect, self.settings, self.context.stage)
        try:
            self._first = await self._sdk("connect_websocket", self._conn.connect_websocket,
                                          self.settings.collection_id)
        except VideoDBCallError as exc:
            if exc.fatal:
                raise
            self._first = exc  # network trouble: the first open() raises it and the reconnect loop retries

    async def open(self) -> tuple[Any, str | None]:
        """Connect through the SDK; returns its websockets connection and the connection id."""
        wrapper, self._first = self._first, None
        if isinstance(wrapper, VideoDBCallError):
            raise wrapper
        if wrapper is None:
            wrapper = await self._sdk("connect_websocket", self._conn.connect_websocket,
                                      self.settings.collection_id)
        try:
            await wrapper.connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise StageError(f"{self.context.stage}: WebSocket connect failed: "
                             f"{type(exc).__name__}: {exc}") from None
        ws = getattr(wrapper, "_connection", None)
        conn_id = wrapper.connection_id
        if ws is None or not conn_id:
            await wrapper.close()
            raise StageError(f"{self.context.stage}: WebSocket sent no connection_id in its first message")
        # The SDK keeps websockets' 1 MiB default; we size-check frames ourselves and dead-letter, up to a
        # bound: a longer message closes the connection (1009) instead of being held whole in memory.
        ws.protocol.max_message_size = read_limit(self.options.max_message_bytes)
        write_private_text(self.state_dir / WS_ID_FILE, str(conn_id))
        return ws, str(conn_id)

    async def batches(self) -> AsyncIterator[Batch]:
        try:
            if not await self.unless_stopped(self._preflight()):
                return  # stopped while VideoDB had not answered yet: nothing was read
            async for batch in super().batches():
                yield batch
        finally:
            try:
                (self.state_dir / PID_FILE).unlink(missing_ok=True)
            except OSError:
                pass

"""What the source, the controller and the runtime share about the live session.

The source learns the WebSocket connection id (and a new one on every
reconnect); the controller needs it to bind AI pipelines; either may ask the
pipeline to end. This object is that meeting point, and nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pipeline.stats import GapStats

if TYPE_CHECKING:
    from stages.sources.inlet import Inlet

ConnectionListener = Callable[[str], Awaitable[None]]


class SessionLink:
    """Connection id announcements and exit requests, inside one event loop."""

    def __init__(self) -> None:
        self.connection_id: str | None = None
        self.capture_session_id: str | None = None
        self.exit_code: int | None = None
        self.exit_reason: str = ""
        self.inlet: Inlet | None = None  # set by a source that takes backfilled events (videodb)
        self.gaps = GapStats()  # reconnects and backfill, for the exit summary
        #: this run will resume a capture session saved by an earlier run (set before sinks start): output is
        #: appended to, never cleared, so a restart keeps the session's earlier events
        self.resuming = False
        #: when the oldest event a sink holds only in memory was handed to it (None: none held); set by the
        #: runtime, read by the controller so the restart checkpoint it saves never passes those events
        self.held_since: Callable[[], float | None] = lambda: None
        self._listeners: list[ConnectionListener] = []
        self._connected = asyncio.Event()
        self._exit = asyncio.Event()

    def on_connection(self, listener: ConnectionListener) -> None:
        """Call `listener(connection_id)` on every (re)connect from now on."""
        self._listeners.append(listener)

    async def announce_connection(self, connection_id: str) -> None:
        """Called by a source when it has a (new) connection id."""
        self.connection_id = connection_id
        self._connected.set()
        for listener in list(self._listeners):
            await listener(connection_id)

    async def wait_connection(self) -> str:
        await self._connected.wait()
        assert self.connection_id is not None
        return self.connection_id

    def request_exit(self, code: int = 0, reason: str = "") -> None:
        """Ask the runtime to stop the source, drain and exit with `code`."""
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason
        self._exit.set()

    @property
    def exit_requested(self) -> bool:
        return self._exit.is_set()

    async def wait_exit(self) -> None:
        await self._exit.wait()

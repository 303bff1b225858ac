"""The session API's check of silent sessions: ask VideoDB about sessions we have not heard from for a while.

A session's lifecycle events can be lost while the WebSocket stays up (the polling after a
reconnect or a restart does not run then): one VideoDB stopped, exported or failed stayed
"active" in the API for ever. Every `api.silent_check_interval`, the sessions not ended that
have sent nothing (and were not checked) for that long are asked for with `get_capture_session`,
oldest-silent first and at most `api.silent_check_max` of them, a few at a time in the SDK's
worker threads; what VideoDB reports is applied as if its event had arrived. A call that runs past
its deadline ends the round (VideoDB is too slow: the rest would wait as long, one deadline per few
sessions); the sessions not asked yet come first in the next one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeVar

from pipeline.videodb_sdk import VideoDBCallError
from stages.controller.lifecycle import reported_status
from stages.controller.sessions import ManagedSession

if TYPE_CHECKING:
    from stages.controller.session_manager import SessionManager

log = logging.getLogger("pipeline.controller.sessions")
T = TypeVar("T")

CONCURRENCY: Final = 4  # get_capture_session calls of the background checks at once (SessionManager.checking)
MISSING_TWICE: Final = 2  # checks in a row answered 404 before a session ends as gone


async def ask_round(slots: asyncio.Semaphore, todo: list[T], ask: Callable[[T], Awaitable[bool]]) -> int:
    """`ask(x)` for each of `todo`, as `slots` allow (the background bound); the first call past its deadline
    (`ask` returns False) ends the round: VideoDB is too slow, the rest would wait as long, one deadline per few.
    Returns how many were left unasked (0 when no call ran late)."""
    late = False
    asked = 0

    async def one(x: T) -> None:
        nonlocal late, asked
        async with slots:
            if late:
                return
            asked += 1
            if not await ask(x):
                late = True

    await asyncio.gather(*(one(x) for x in todo))
    return len(todo) - asked if late else 0


class SilentCheck:
    """The periodic check of one `SessionManager`'s silent sessions."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager
        self.interval: float = manager.opts.api.silent_check_interval
        self.limit: int = manager.opts.api.silent_check_max
        self._missing: dict[str, int] = {}  # session id -> checks in a row answered 404

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_once()

    def due(self, now: float) -> list[ManagedSession]:
        """The sessions to ask about now: not ended, silent and unchecked for an interval; oldest first."""
        quiet = now - self.interval
        silent = (s for s in self.m.sessions.values()
                  if not s.lifecycle.done and max(s.heard, s.checked) <= quiet)
        return heapq.nsmallest(self.limit, silent, key=lambda s: max(s.heard, s.checked))

    async def check_once(self) -> None:
        now = time.monotonic()

        async def ask(s: ManagedSession) -> bool:
            s.checked = now
            return await self._check(s)

        left = await ask_round(self.m.checking, self.due(now), ask)
        if left:
            log.warning("%s: VideoDB is answering too slowly: %d silent session(s) left for the next check",
                        self.m.who, left)
        for sid in [sid for sid in self._missing if sid not in self.m.sessions]:
            del self._missing[sid]

    async def _check(self, s: ManagedSession) -> bool:
        """Ask about one session; False when the call ran past its deadline."""
        sid = s.id
        try:
            session = await self.m._sdk("get_capture_session", self.m.conn.get_capture_session,
                                        sid, self.m.settings.collection_id)
        except VideoDBCallError as exc:
            if exc.overdue:
                log.warning("%s (checking a silent session)", exc)
                return False
            missing = self._missing.get(sid, 0) + 1 if exc.status == 404 else 0
            self._missing[sid] = missing
            if missing >= MISSING_TWICE and not s.lifecycle.done:
                self.m._transition(s, "failed", error=f"capture session {sid} no longer exists at VideoDB ({exc})")
            else:
                log.warning("%s (checking a silent session)", exc)
            return True
        self._missing.pop(sid, None)
        if s.lifecycle.done:
            return True
        status = reported_status(session)
        if status == "stopped" and getattr(session, "export_status", None) == "failed":
            self.m._transition(s, "failed", error="VideoDB could not export it (export_status failed)")
        elif isinstance(status, str) and s.lifecycle.behind(status):
            log.info("%s: capture session %s sent nothing for %gs; VideoDB reports it %s",
                     self.m.who, sid, self.interval, status)
            self.m._transition(s, status, session=session, error="reported by get_capture_session")
        return True

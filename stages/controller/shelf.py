"""Sessions stopped through the API before they started and pushed out of memory: files kept until they can't start.

Beyond `max_sessions` such a session leaves memory but its file stays: while VideoDB has it
`created`, a desktop client may still start it (a restart then stops it), and the lookup for a
lost create must know it is ours (that lookup takes an unknown `created` session with the same end
user and metadata for the one a lost create made). Before, nothing asked about it again, and a
restart that pushed it out of memory at once (more such records than `max_sessions`) never did
either, so its file stayed for ever. Now, every `api.silent_check_interval`, up to
`api.silent_check_max` of them (asked longest ago first) are asked for with `get_capture_session` (a call
past its deadline ends the round, as in the silent check).
Once VideoDB reports one `failed` or `exported`, `stopped` with nothing stored, or answers 404 twice
in a row, it can never start again and no longer looks like a lost create (only `created` ones
do), so its file goes; while its Idempotency-Key is still answered from the file, the new status
is saved instead, and the file goes with the key.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from pipeline.videodb_sdk import VideoDBCallError
from stages.controller import session_tokens
from stages.controller.lifecycle import TERMINAL, reported_status, stored
from stages.controller.silent_check import MISSING_TWICE, ask_round

if TYPE_CHECKING:
    from stages.controller.session_manager import SessionManager

log = logging.getLogger("pipeline.controller.sessions")


class Shelf:
    """The out-of-memory, never-started, stopped sessions of one `SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager
        self.ids: OrderedDict[str, int] = OrderedDict()  # id -> checks in a row answered 404; asked longest ago first
        #: id -> its client tokens, masked in logs while a desktop client may still start it with one
        self.tokens: dict[str, list[str]] = {}

    def add(self, sid: str, tokens: list[str]) -> None:
        self.ids.setdefault(sid, 0)
        self.tokens[sid] = tokens

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.m.silent.interval)
            await self.check_once()

    async def check_once(self) -> None:
        """Ask about those asked longest ago; a call past its deadline ends the round, as the silent check's does
        (else 50 of them against a slow VideoDB took one deadline per 4: 13 minutes, holding 4 SDK threads)."""
        async def ask(sid: str) -> bool:
            if sid not in self.ids:  # gone since the round began
                return True
            self.ids.move_to_end(sid)  # asked now: those not asked come first next time
            return await self._check(sid)

        left = await ask_round(self.m.checking, list(itertools.islice(self.ids, self.m.silent.limit)), ask)
        if left:
            log.warning("%s: VideoDB is answering too slowly: %d session(s) stopped before they started left for "
                        "the next check", self.m.who, left)

    async def _check(self, sid: str) -> bool:
        """Ask about one; False when the call ran past its deadline."""
        try:
            session = await self.m._sdk("get_capture_session", self.m.conn.get_capture_session,
                                        sid, self.m.settings.collection_id)
        except VideoDBCallError as exc:
            if exc.status != 404 or sid not in self.ids:
                log.warning("%s (checking a session stopped before it started)", exc)
                return not exc.overdue
            self.ids[sid] += 1
            if self.ids[sid] >= MISSING_TWICE:
                self._ended(sid, "gone", {"status": "failed", "error": f"capture session {sid} no longer exists "
                                                                          "at VideoDB"})
            return True
        if sid in self.ids:
            self.ids[sid] = 0
        status = reported_status(session)
        if status == "failed":
            self._ended(sid, status, {"status": status, "error": "reported by get_capture_session"})
        elif status in TERMINAL:
            self._ended(sid, status, {"status": status})
        elif status == "stopped" and stored(session) is False:
            self._ended(sid, "stopped with nothing stored", {"status": status, "stored": False})
        return True

    def _ended(self, sid: str, what: str, change: dict[str, Any]) -> None:
        if self.ids.pop(sid, None) is None:
            return
        session_tokens.forget_all(self.tokens.pop(sid, []))
        record = self.m.store.load(sid)
        if record is None:
            return
        key = record.get("idempotency_key")
        if isinstance(key, str) and self.m.forgotten_keys.get(key) == sid:
            self.m.store.save({**record, **change})  # a late retry with its key is still answered from it
        else:
            self.m.store.drop(sid)
        log.info("%s: capture session %s, stopped before it started, is %s at VideoDB: it can no longer start",
                 self.m.who, sid, what)

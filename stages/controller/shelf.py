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

Bounded: VideoDB may keep one `created` for ever. Its client tokens are masked only until they
expire (the record's `expires_at`, that of the newest; nobody can start it with them after that), and
the shelf holds at most SHELF_MAX sessions: one more pushes off the one whose tokens expire first
(expired ones first, as nobody can start those any more). Its file stays, so it is not lost: a lost
create's lookup still knows it is ours, and a restart reads it back (shelved again while there is room).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from pipeline.events import iso_seconds
from pipeline.videodb_sdk import VideoDBCallError
from stages.controller import session_tokens
from stages.controller.lifecycle import TERMINAL, reported_status, stored
from stages.controller.silent_check import MISSING_TWICE, ask_round

if TYPE_CHECKING:
    from stages.controller.session_manager import SessionManager

log = logging.getLogger("pipeline.controller.sessions")

SHELF_MAX: Final = 10_000  # sessions on the shelf (each an id, a few tokens and a time: ~1 KB)


class Shelf:
    """The out-of-memory, never-started, stopped sessions of one `SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager
        self.ids: OrderedDict[str, int] = OrderedDict()  # id -> checks in a row answered 404; asked longest ago first
        #: id -> its client tokens, masked in logs while a desktop client may still start it with one
        self.tokens: dict[str, list[str]] = {}
        self.expires: dict[str, float] = {}  # id -> when its tokens expire (unix time; inf: not known)
        #: (expires, id), soonest first, to push off a full shelf; entries no longer in `expires` are skipped
        self._soonest: list[tuple[float, str]] = []
        self.pushed_off = 0  # sessions pushed off a full shelf since the last warning

    def add(self, sid: str, tokens: list[str], expires_at: Any) -> None:
        """Shelve a session with its client tokens (masked until `expires_at`, the ISO time they expire)."""
        if sid not in self.ids and len(self.ids) >= SHELF_MAX:
            self._push_off()
        self.ids.setdefault(sid, 0)
        expires = iso_seconds(expires_at)
        self.expires[sid] = math.inf if expires is None else expires
        heapq.heappush(self._soonest, (self.expires[sid], sid))
        self.tokens[sid] = tokens
        if self.expires[sid] <= time.time():  # a restart's, expired while it was down (kept listed: a restart
            session_tokens.forget_all(tokens)  # masks a record's tokens once it is added; the next check forgets)

    def _push_off(self) -> None:
        """The shelf is full: the session whose tokens expire first leaves it (its file stays for a restart)."""
        while True:
            expires, sid = heapq.heappop(self._soonest)
            if self.expires.get(sid) == expires:
                break
        self.ids.pop(sid, None)
        self.expires.pop(sid, None)
        session_tokens.forget_all(self.tokens.pop(sid, []))
        if not self.pushed_off:
            log.warning("%s: %d sessions stopped before they started are kept for VideoDB to be asked about, the "
                        "most there may be: those whose client tokens expire first are no longer asked about in "
                        "this run (their files stay; a restart reads them again)", self.m.who, SHELF_MAX)
        self.pushed_off += 1

    def expire(self, now: float) -> None:
        """Stop masking the tokens that have expired (they start nothing any more; the sessions stay shelved).
        Run at every check: they are unmasked within one check interval of expiring."""
        for sid in [sid for sid, t in self.expires.items() if t <= now and self.tokens.get(sid)]:
            session_tokens.forget_all(self.tokens.pop(sid))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.m.silent.interval)
            await self.check_once()

    async def check_once(self) -> None:
        """Ask about those asked longest ago; a call past its deadline ends the round, as the silent check's does
        (else 50 of them against a slow VideoDB took one deadline per 4: 13 minutes, holding 4 SDK threads)."""
        self.expire(time.time())
        if len(self._soonest) > 2 * len(self.expires) + 64:  # those that left the shelf otherwise
            self._soonest = [(t, sid) for sid, t in self.expires.items()]
            heapq.heapify(self._soonest)
        if self.pushed_off > 1:
            log.warning("%s: %d more session(s) stopped before they started pushed off the full shelf (%d)",
                        self.m.who, self.pushed_off - 1, SHELF_MAX)
        self.pushed_off = 0

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
                gone = f"capture session {sid} no longer exists at VideoDB"
                await self._ended(sid, "gone", {"status": "failed", "error": gone})
            return True
        if sid in self.ids:
            self.ids[sid] = 0
        status = reported_status(session)
        if status == "failed":
            await self._ended(sid, status, {"status": status, "error": "reported by get_capture_session"})
        elif status in TERMINAL:
            await self._ended(sid, status, {"status": status})
        elif status == "stopped" and stored(session) is False:
            await self._ended(sid, "stopped with nothing stored", {"status": status, "stored": False})
        return True

    async def _ended(self, sid: str, what: str, change: dict[str, Any]) -> None:
        """It can no longer start: off the shelf; its file goes, or records the change while its key is answered
        from it (read in a thread, one at a time with the other reads of records out of memory)."""
        if self.ids.pop(sid, None) is None:
            return
        self.expires.pop(sid, None)
        session_tokens.forget_all(self.tokens.pop(sid, []))
        async with self.m._reading:
            record = await asyncio.to_thread(self.m.store.load, sid)
        if record is None:
            return
        key = record.get("idempotency_key")
        if isinstance(key, str) and self.m.forgotten_keys.get(key) == sid:
            self.m.store.save({**record, **change})  # a late retry with its key is still answered from it
        else:
            self.m.store.drop(sid)
        log.info("%s: capture session %s, stopped before it started, is %s at VideoDB: it can no longer start",
                 self.m.who, sid, what)

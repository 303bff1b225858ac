"""Many capture sessions on one pipeline: create, track, re-bind, stop, persist, re-attach.

Used by the `capture_session` controller when `api:` is set. Every session is
created bound to the pipeline's one WebSocket connection; after a reconnect
every live session's AI pipelines are re-bound to the new connection id. Each
session follows its own lifecycle; none of them ends the pipeline. Records
persist in `<state_dir>/sessions/` so a restarted pipeline re-attaches every
session that is still live. The SDK is synchronous: every call runs in a
thread, and `observe()` only counts and schedules.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline import secrets
from pipeline.api import Batch, Event
from pipeline.events import iso_seconds, iso_ts, lifecycle_status
from pipeline.videodb_sdk import VideoDBCallError, call, client_token
from stages.controller import session_tokens
from stages.controller.ai_pipelines import (
    MAX_STREAMS,
    AIPipelines,
    OnActive,
    Stream,
    media_kind,
    of_sdk,
    retry_wait,
    streams_from_event,
    usable_id,
)
from stages.controller.checkpoints import Checkpoints
from stages.controller.ended_backfill import fetch_with_retries
from stages.controller.lifecycle import TERMINAL, ended_unstored, export_wait, reported_status
from stages.controller.session_create import ApiProblem, SessionCreator, videodb_problem
from stages.controller.session_store import SessionStore
from stages.controller.sessions import ManagedSession
from stages.controller.shelf import Shelf
from stages.controller.silent_check import CONCURRENCY, SilentCheck
from stages.controller.tasks import Background
from stages.sources import backfill

log = logging.getLogger("pipeline.controller.sessions")

_EARLY_SESSIONS: Final = 1000  # lifecycle events for ids we do not know yet (the create call has not returned)
_EARLY_PER_SESSION: Final = 10
_COUNTED: Final = frozenset({"transcript", "visual_index", "scene_index", "audio_index", "alert"})
FORGOTTEN_KEYS: Final = 65536  # Idempotency-Keys of sessions beyond max_sessions, answered from their files
CHECKPOINT_FILE: Final = "backfill_from.checkpoint"  # where a restart's backfill starts, for every session
#: a record's `media_types` per stream kind: shared tuples (saved as JSON lists), so the many sessions' rtstream
#: entries hold nothing the garbage collector has to walk
_MEDIA_TYPES: Final[dict[str | None, tuple[str, ...]]] = {"audio": ("audio",), "video": ("video",), None: ()}
CHECKPOINT_EVERY: Final = 2.0  # seconds (> the sinks' flush interval; saved one period behind)


class SessionManager:
    """The registry of API-managed sessions and everything done to them."""

    def __init__(self, controller: Any, state_dir: Path) -> None:
        self.ctl = controller
        self.opts = controller.options
        self.settings = controller.settings
        self.who: str = controller.who
        self.link = controller.context.session
        self.stats = controller.context.stats
        self.store = SessionStore(state_dir)
        self.sessions: OrderedDict[str, ManagedSession] = OrderedDict()  # in the order added (`seq`)
        self._seq = itertools.count(1)
        self.run = os.urandom(4).hex()  # names this registry in list cursors (the numbers restart with it)
        self.by_stream: dict[str, ManagedSession] = {}
        self.idempotency: dict[str, str] = {}  # Idempotency-Key -> session id
        self.forgotten_keys: OrderedDict[str, str] = OrderedDict()  # keys of sessions evicted from memory
        self._reading = asyncio.Lock()  # records out of memory are read one at a time, off the loop
        self.creator = SessionCreator(self)
        self.silent = SilentCheck(self)
        self.shelf = Shelf(self)  # stopped before they started, out of memory, files kept
        self._early: OrderedDict[str, list[Event]] = OrderedDict()
        self._background = Background(self.who, self.stats, log)
        self._spawn = self._background.spawn
        #: background SDK work at once, all kinds together (the checks of silent sessions, of the shelf, of
        #: sessions the listing left out and of stopped ones for a stored channel; the stops a restart sends
        #: again; binds and re-binds): the SDK's few worker threads stay free for the API's own calls
        self.checking = asyncio.Semaphore(CONCURRENCY)
        self._poll: asyncio.Task[None] | None = None
        self._poll_seen: dict[str, str] = {}
        self._unlisted: dict[str, int] = {}  # session id -> listings in a row that left it out
        self._saved_checkpoint: dict[str, int] | None = None
        self._backfill_retries: set[str] = set()  # sessions whose failed backfill is queued to run again
        self.conn: Any = None

    async def _sdk(self, what: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await call(self.who, what, fn, *args, api_key=self.settings.api_key, **kwargs)

    # --- start: re-attach what a previous run left ---------------------------------------------

    async def start(self, conn: Any) -> None:
        self.conn = conn
        self.store.on_lost = partial(asyncio.get_running_loop().call_soon_threadsafe, self._save_all_again)
        self.store.clean_temporaries()
        swept = self.store.drop_expired_intents(now=True)
        if swept is not None:
            await swept
        records = self.store.load_all()
        if records and self.ctl.context.settings.get("new_session"):
            log.info("%s: --new-session: not re-attaching the sessions saved in %s", self.who, self.store.dir)
            records = []
        for record in records:
            s = self._add(record)
            s.lifecycle.unstored = record.get("stored") is False
            status = record.get("status")
            if isinstance(status, str):
                s.lifecycle.advance(status, polled=True)
            _mask_token(s)
            if s.record.get("rtstreams") and not s.lifecycle.done:  # a finished one's send nothing more
                self._index_streams(s)
        self.link.on_connection(self._on_connection)
        self._spawn(self._watch_store())
        self._spawn(self.silent.run())
        self._spawn(self.shelf.run())
        live = [s for s in self.sessions.values() if s.live]
        inlet = self.link.inlet
        if inlet is not None:
            if live:  # the gap since the last run's events; without a checkpoint, since the session began
                inlet.resume(self.store.read_json(CHECKPOINT_FILE))
                inlet.resume({k: t for s in live for k, t in _backfill_marks(s).items()})
            self._spawn(self._checkpoints(inlet))
        if live:
            log.info("%s: re-attaching %d live capture session(s) from %s", self.who, len(live), self.store.dir)
            self._spawn(self._reattach(live))
        elif any(not s.lifecycle.done for s in self.sessions.values()):
            self._start_poll()  # stopped through the API, not ended yet: their events go to the old connection
        for s in self.sessions.values():  # a stop the last run did not finish (a crash, a failed call)
            if s.record.get("stop_incomplete") and not s.lifecycle.done:
                self._spawn(self._stop_again(s))
            if s.lifecycle.state == "stopped" and not s.lifecycle.done:  # export_timeout from its first stop
                self._spawn(self._await_export(s))

    async def _fetch(self, s: ManagedSession) -> Any:
        """The session as VideoDB has it now, or None (the failed call is logged and counted).

        An active session that could not be bound for want of this answer is bound again one
        `status_poll_interval` later (after a 429, no sooner than its Retry-After), unless VideoDB refused
        the call outright (4xx).
        """
        try:
            return await self._sdk("get_capture_session", self.conn.get_capture_session,
                                   s.id, self.settings.collection_id)
        except VideoDBCallError as exc:
            log.error("%s", exc)
            self.stats.errors += 1
            if not exc.fatal and s.live and s.lifecycle.state == "active":
                self._spawn(self._bind_later(s, retry_wait(self.opts.status_poll_interval, exc.retry_after)))
            return None

    async def _bind_later(self, s: ManagedSession, delay: float) -> None:
        """Bind after `delay`: before, a 429's Retry-After was not waited for (asked again every interval)."""
        await asyncio.sleep(delay)
        pipes = s.pipelines
        if s.live and s.lifecycle.state == "active" and (pipes is None or pipes.bound_to != self.link.connection_id):
            await self._bind(s, None, backfill_gap=True)

    async def _reattach(self, live: list[ManagedSession]) -> None:
        """Re-attach the sessions a previous run left: one listing for all (a GET each only for those it
        lacks), and the status poll from the start, so a slow VideoDB costs one call, not one per session."""
        conn_id = await self.link.wait_connection()
        self._start_poll()
        try:
            listed = {str(getattr(x, "id", "")): x for x in await self._sdk(
                "list_capture_sessions", self.conn.list_capture_sessions, self.settings.collection_id)}
        except VideoDBCallError as exc:
            log.warning("%s; asking for each session instead", exc)
            listed = {}
        await asyncio.gather(*(self._reattach_one(s, listed.get(s.id), conn_id) for s in live))

    async def _reattach_one(self, s: ManagedSession, session: Any, conn_id: str) -> None:
        """One session: as listed, else asked for by id with the other background work, a few at a time (one
        after another, 300 the listing left out took 300 answers in a row: minutes against a slow VideoDB)."""
        if session is None:
            async with self.checking:
                session = None if s.lifecycle.done else await self._fetch(s)  # ended while it waited: nothing to do
            if session is None:
                return
        status = reported_status(session) or s.record.get("status") or "created"
        if s.lifecycle.behind(status):
            if s.lifecycle.state == "active":  # it ended while no run was up: its last events went nowhere
                await self._backfill_ended(s, session)
            self._transition(s, status, session=session)
        elif s.lifecycle.state == "active":
            self._spawn(self._bind(s, _streams_of(session), backfill_gap=True))
        log.info("%s: re-attached capture session %s (%s) to connection %s",
                 self.who, s.id, s.lifecycle.state, conn_id)

    async def _backfill_ended(self, s: ManagedSession, session: Any) -> None:
        """Fetch what a session the last run had active produced after its checkpoint, before it stopped while
        no run was up (no re-bind: it has ended). Before, only sessions still active were backfilled. A fetch that
        fails in a way worth another try (5xx, 429, network) is tried again after `status_poll_interval`, up to
        ended_backfill.TRIES times in all (tried once, a VideoDB 5xx at the restart lost those events for good)."""
        inlet = self.link.inlet
        if inlet is None or s.pipelines is not None:
            return
        who = f"{self.who} {s.id}"
        pipes = AIPipelines(self.conn, s.on_active, who, self.settings.api_key, self.opts.callback_url)
        pipes.streams = _streams_of(session)
        pipes.adopt_indexes(self.conn, s.record.get("indexes"))
        got = await fetch_with_retries(pipes, inlet, who, self.settings.api_key, s.id, self.opts.status_poll_interval,
                                       gate=self.checking)
        log.info("%s: backfill of a session that ended meanwhile: %s", who,
                 ", ".join(f"{ch} {n}" for ch, n in sorted(got.items())) or "nothing missing")

    # --- the API's operations ------------------------------------------------------------------

    async def create(self, end_user_id: str, metadata: dict[str, Any], on_active: OnActive | None,
                     key: str | None, fingerprint: str) -> tuple[ManagedSession, bool]:
        """(session, created now). A known Idempotency-Key returns its session (same request only)."""
        return await self.creator.create(end_user_id, metadata, on_active, key, fingerprint)

    def _keep(self, record: dict[str, Any], status: str | None) -> ManagedSession:
        """A session VideoDB made for us: registered, its record queued (then its create's intent dropped); the
        create awaits `store.flushed` before it answers, so its 201 promises a restart knows the session."""
        s = self._add(record)
        s.lifecycle.advance(status or "created")
        s.record["status"] = s.lifecycle.state
        _mask_token(s)  # one a lost create's note kept was made by an earlier try (or run)
        key = record.get("idempotency_key")
        # the note goes only once the record is written, not before: a restart finds the session by it
        self.store.save(s.record, then=partial(self.store.drop_intent, key) if isinstance(key, str) else None)
        return s

    async def _forgotten(self, key: str) -> ManagedSession | None:
        """The finished session a key created, read back from its file after it left memory (a late retry).

        Read in a thread (a record holds up to 16 MiB of metadata: parsing it on the event loop stalled every
        request and event for as long), one at a time (as many retries at once hold one record in memory, as
        when the loop read them one after another)."""
        sid = self.forgotten_keys.get(key)
        if sid is None:
            return None
        async with self._reading:
            record = await asyncio.to_thread(self.store.load, sid)
        if record is None or record.get("idempotency_key") != key:
            return None
        return self._managed(record)

    def _managed(self, record: dict[str, Any]) -> ManagedSession:
        spec = record.get("on_active")
        try:
            on_active = OnActive.model_validate(spec) if spec else self.opts.on_active
        except ValueError:
            on_active = self.opts.on_active
        return ManagedSession(record, on_active)

    def _add(self, record: dict[str, Any]) -> ManagedSession:
        s = self._managed(record)
        held = self.sessions.get(s.id)
        s.seq = held.seq if held is not None else next(self._seq)  # the registry keeps a known id's place
        self.sessions[s.id] = s
        key = record.get("idempotency_key")
        if isinstance(key, str):
            self.idempotency[key] = s.id
        self._evict()
        return s

    def _evict(self) -> None:
        """Forget the oldest finished sessions beyond max_sessions.

        Then, if still over, sessions stopped through the API before they started (nothing may ever end
        them). One stopped after it started is kept: it is followed to its end (status, video id).
        A finished session's file goes with it unless its Idempotency-Key is among the FORGOTTEN_KEYS
        remembered (then it goes when the key does), so `sessions/` does not grow with every session ever
        made, nor a restart's reading of it. Files of sessions not finished stay (a restart follows them); one
        stopped before it started goes on the shelf, which drops its file once VideoDB says it cannot start.
        """
        excess = len(self.sessions) - self.opts.api.max_sessions
        if excess <= 0:
            return
        items = self.sessions.items()
        # oldest first, and only as many as needed: a restart adds every saved record through here, and a
        # full list per record made it quadratic (6,000 records, max_sessions 3,000: 4 s to start)
        ended = (sid for sid, s in items if s.lifecycle.done)
        unstarted = (sid for sid, s in items if not s.live and s.lifecycle.state in (None, "created"))
        for sid in list(itertools.islice(itertools.chain(ended, unstarted), excess)):
            s = self.sessions.pop(sid)
            key = s.record.get("idempotency_key")
            if isinstance(key, str) and self.idempotency.pop(key, None) is not None:
                self.forgotten_keys[key] = sid  # a late retry is answered from the session's file
                if len(self.forgotten_keys) > FORGOTTEN_KEYS:
                    self._spawn(self._drop_record(self.forgotten_keys.popitem(last=False)[1]))
            elif s.lifecycle.done:
                self.store.drop(sid)
            self._unindex_streams(s)
            if s.lifecycle.done:
                _forget_token(s)
            else:  # its file, and the masking of its tokens, go once VideoDB says it can no longer start
                self.shelf.add(sid, session_tokens.tokens(s.record), s.record.get("expires_at"))

    async def _drop_record(self, sid: str) -> None:
        """The file of a session no longer in memory and no longer asked for by key, if it has finished (read in
        a thread, as for a retried key: read on the loop, a slow disk held up the create that pushed it out)."""
        async with self._reading:
            record = await asyncio.to_thread(self.store.load, sid) or {}
        status = record.get("status")
        if status in TERMINAL or (status == "stopped" and record.get("stored") is False):
            self.store.drop(sid)

    def get(self, sid: str) -> ManagedSession:
        s = self.sessions.get(sid)
        if s is None:
            raise ApiProblem(404, f"no capture session {sid[:80]!r} here")
        return s

    async def stop(self, sid: str) -> ManagedSession:
        """Stop the session's AI pipelines and rtstreams; the pipeline stops re-binding it."""
        s = self.get(sid)
        if s.lifecycle.done or (s.record.get("stop_requested") and not s.record.get("stop_incomplete")):
            return s  # a stop whose calls all went through is not sent again
        s.record["stop_requested"] = True
        s.record["stop_incomplete"] = True  # until every call went through (a crash now: the restart stops it)
        self.store.save(s.record)
        await self.store.flushed(s.id)  # on disk before VideoDB is asked (as it was when written on the loop)
        async with s.lock:
            if not s.record.get("stop_incomplete"):  # a stop sent meanwhile (a concurrent POST) went through
                return s
            failed = await self._stop_streams(s)
        if failed:  # a rate limit first: it is why the client should wait before it sends the stop again
            first = next((exc for exc in failed if exc.status == 429), failed[0])
            raise videodb_problem(first, f"{len(failed)} call(s) to stop it failed ({first}); "
                                         "POST /stop again to retry them")
        return s

    async def _stop_streams(self, s: ManagedSession) -> list[VideoDBCallError]:
        """Stop transcripts, indexes and rtstreams; each failure is logged, the rest still stop.

        Returns the failures worth another try (network, 5xx): the session is then marked
        `stop_incomplete` (saved), so another POST /stop tries again (a complete stop is not repeated).
        """
        failed: list[VideoDBCallError] = []
        pipes = s.pipelines
        if pipes is None and s.record.get("indexes"):  # after a restart: the indexes its file names
            pipes = AIPipelines(self.conn, s.on_active, f"{self.who} {s.id}", self.settings.api_key)
            pipes.adopt_indexes(self.conn, s.record.get("indexes"))
        streams = pipes.streams if pipes is not None else []
        if not streams and s.lifecycle.state in ("active", "starting", "created"):
            try:
                session = await self._sdk("get_capture_session", self.conn.get_capture_session,
                                          s.id, self.settings.collection_id)
                streams = _streams_of(session)
            except VideoDBCallError as exc:
                log.warning("%s", exc)
                if not exc.fatal:
                    failed.append(exc)
        if pipes is not None:
            indexes: dict[str, list[Any]] = getattr(pipes, "_indexes", {})
            for index in (i for kind in indexes.values() for i in kind):
                await self._quiet(f"stop index {index.rtstream_index_id}", index.stop, failed)
            pipes.bound_to = None
        for st in streams:
            if st.kind == "audio" and s.on_active.transcript and (pipes is not None or s.lifecycle.state == "active"):
                await self._quiet(f"stop_transcript({st.name})", st.rts(self.conn).stop_transcript, failed)
            await self._quiet(f"stop rtstream {st.name}", st.rts(self.conn).stop, failed)
        log.info("%s: capture session %s stopped through the API (%d rtstreams%s)", self.who, s.id, len(streams),
                 f", {len(failed)} call(s) failed" if failed else "")
        if bool(failed) != bool(s.record.get("stop_incomplete")):
            s.record["stop_incomplete"] = bool(failed)
            self.store.save(s.record)
        return failed

    async def _quiet(self, what: str, fn: Any, failed: list[VideoDBCallError]) -> None:
        try:
            await self._sdk(what, fn)
        except VideoDBCallError as exc:
            log.warning("%s", exc)
            if not exc.fatal:  # network, 5xx: worth sending again (a 4xx, e.g. already stopped, is not)
                failed.append(exc)

    async def new_token(self, sid: str) -> dict[str, Any]:
        """A new client token for the session: the answer, taken before its record is awaited on disk (a rotation
        meanwhile replaces the record's token, not the one this call hands out)."""
        s = self.get(sid)
        _token_allowed(s)
        try:
            token = await client_token(self.who, self.conn, self.opts.client_token_expires_in,
                                       self.settings.api_key)
        except VideoDBCallError as exc:
            raise videodb_problem(exc) from None
        if not s.live:  # stopped or ended while VideoDB made the token: nobody gets it (nor is it masked for ever)
            secrets.forget(token)
            _token_allowed(s)
        session_tokens.replace(s.record, token)  # the one it replaces stays masked: a client may hold it still
        s.record["expires_at"] = iso_ts(time.time() + self.opts.client_token_expires_in)
        answer = {"session_id": s.id, "client_token": token, "expires_at": s.record["expires_at"]}
        self.store.save(s.record)
        await self.store.flushed(s.id)  # on disk before it is handed out: a restart masks it in logs
        return answer

    # --- the stream ----------------------------------------------------------------------------

    def observe(self, batch: Batch) -> None:
        """Count events per session, tag them with their session, follow lifecycle events."""
        by_stream = self.by_stream
        seen: ManagedSession | None = None
        for event in batch:
            if "event" in event:
                status = lifecycle_status(event)
                sid = event.get("capture_session_id")
                if status is None or not isinstance(sid, str):
                    continue
                s = self.sessions.get(sid)
                if s is None:
                    self._remember_early(sid, event)
                    continue
                s.counts["capture_session"] = s.counts.get("capture_session", 0) + 1
                s.heard = time.monotonic()
                self._lifecycle_event(s, event, status)
                continue
            rid = event.get("rtstream_id")
            s = by_stream.get(rid) if type(rid) is str else None
            if s is None:
                continue
            if "capture_session_id" not in event:
                event["capture_session_id"] = s.record["session_id"]
            ch = event.get("channel")
            key = ch if ch in _COUNTED else "other"  # channel names come from the wire: a bounded set of keys
            counts = s.counts
            counts[key] = counts.get(key, 0) + 1
            if seen is not s:
                s.last_event = time.time()
                s.heard = time.monotonic()
                seen = s
        if seen is not None:
            seen.last_event = time.time()
            seen.heard = time.monotonic()

    def _remember_early(self, sid: str, event: Event) -> None:
        early = self._early.get(sid)
        if early is None:
            if len(self._early) >= _EARLY_SESSIONS:
                self._early.popitem(last=False)
            early = self._early[sid] = []
        if len(early) < _EARLY_PER_SESSION:
            early.append(event)

    def _lifecycle_event(self, s: ManagedSession, event: Event, status: str) -> None:
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        self._transition(s, status, event_data=data, error=data.get("error") or event.get("error"))

    def _transition(self, s: ManagedSession, status: str, *, event_data: dict[str, Any] | None = None,
                    session: Any = None, error: Any = None) -> None:
        """Apply one status (from an event, or from polling/re-attaching) and act on it."""
        if not s.lifecycle.advance(status, polled=session is not None):
            return
        if event_data is None and session is not None:  # polled: the listing has the video id, not the URLs
            event_data = {"exported_video_id": getattr(session, "exported_video_id", None)}
        s.apply_status(status, event_data, error)
        if status == "active":
            rts = (event_data or {}).get("rtstreams")
            if rts:
                streams = streams_from_event(rts, self.settings.collection_id)
            elif session is not None and getattr(session, "rtstreams", None):
                streams = _streams_of(session)
            else:
                streams = None
            if streams:
                self._learn_streams(s, streams)
            self._spawn(self._stop_streams_locked(s) if s.record.get("stop_requested") else self._bind(s, streams))
        elif status == "failed":
            log.error("%s: capture session %s failed: %s", self.who, s.id, s.record.get("error"))
        elif status == "stopped":
            s.record.setdefault("stopped_at", iso_ts(time.time()))  # a restart keeps counting from here
            self._spawn(self._end_if_unstored(s, session))
            self._spawn(self._await_export(s))
        if s.lifecycle.done:
            self._forget_streams(s)
        self.store.save(s.record)

    async def _end_if_unstored(self, s: ManagedSession, session: Any) -> None:
        """`stopped`: with no stored channel VideoDB exports nothing, so the session ends here (else it would
        stay live for ever: counted under max_sessions, polled, re-attached by every restart)."""
        async def fetch() -> Any:  # many sessions may stop at once (the end of a shift): a few asks at a time
            async with self.checking:
                return await self._sdk("get_capture_session", self.conn.get_capture_session, s.id,
                                       self.settings.collection_id)

        if not await ended_unstored(s.lifecycle, s.record, session, fetch):
            return
        log.info("%s: capture session %s stopped and none of its channels is stored: no export follows",
                 self.who, s.id)
        self._forget_streams(s)
        self.store.save(s.record)

    async def _await_export(self, s: ManagedSession) -> None:
        """`stopped`: an export that has not come `export_timeout` after the first stop (`stopped_at`, saved)
        ends the session as failed (else it stayed `stopped` for ever: live, polled, re-attached by restarts)."""
        timeout = self.opts.export_timeout
        if not isinstance(s.record.get("stopped_at"), str):  # a record saved before stopped_at was
            s.record["stopped_at"] = iso_ts(time.time())
            self.store.save(s.record)
        await asyncio.sleep(export_wait(s.record["stopped_at"], timeout, time.time()))
        if s.lifecycle.state == "stopped" and not s.lifecycle.done:
            self._transition(s, "failed", error=f"stopped but was not exported within export_timeout={timeout:g}s "
                                                f"of stopping (stopped at {s.record['stopped_at']})")

    async def _stop_again(self, s: ManagedSession) -> None:
        """A stop the last run did not finish, sent again a few at a time (a restart may find hundreds)."""
        async with self.checking:
            if s.record.get("stop_incomplete") and not s.lifecycle.done:
                await self._stop_streams_locked(s)

    async def _stop_streams_locked(self, s: ManagedSession) -> None:
        async with s.lock:
            await self._stop_streams(s)

    def _learn_streams(self, s: ManagedSession, streams: list[Stream]) -> None:
        self._unindex_streams(s)  # the lookup holds exactly the ids its record lists (eviction reads them there)
        s.remember_streams([{"rtstream_id": st.id, "name": st.name, "media_types": _MEDIA_TYPES[st.kind]}
                            for st in streams])
        self._index_streams(s)

    def _index_streams(self, s: ManagedSession) -> None:
        for r in s.record.get("rtstreams") or []:
            rid = r.get("rtstream_id") if isinstance(r, dict) else None
            if isinstance(rid, str):
                self.by_stream[rid] = s

    def _forget_streams(self, s: ManagedSession) -> None:
        """A finished session's rtstreams send nothing more: drop the lookup entries and the poller's note on
        it, keep the counters (and its client token, which starts nothing any more, is no longer masked in
        logs)."""
        _forget_token(s)
        self._poll_seen.pop(s.id, None)
        ids = self._unindex_streams(s)
        if self.link.inlet is not None:
            self.link.inlet.forget(str(rid) for rid in ids)  # its dedupe keys and backfill marks

    def _unindex_streams(self, s: ManagedSession) -> list[Any]:
        """Drop the session's rtstreams from the lookup; returns their ids."""
        ids = [r.get("rtstream_id") for r in s.record.get("rtstreams") or [] if isinstance(r, dict)]
        for rid in ids:
            if isinstance(rid, str) and self.by_stream.get(rid) is s:
                del self.by_stream[rid]
        return ids

    # --- AI pipelines and reconnects -----------------------------------------------------------

    async def _bind(self, s: ManagedSession, streams: list[Stream] | None, *, backfill_gap: bool = False,
                    held: bool = False) -> None:
        """Bind the session's AI pipelines to the current connection id, then backfill the gap.

        A backfill runs after a re-bind (the pipelines had been bound to another connection) or
        when asked (`backfill_gap`: re-attached after a restart). `held`: the source's inlet was put
        on hold for this call (live events wait for the backfill); released at the end.
        """
        try:
            # with the other background work, a few at a time: hundreds re-bound after a reconnect took every SDK
            # worker thread (8 at once, 6 threads on 2 cores) and each of a create's calls waited behind them
            async with self.checking, s.lock:
                s.rebind_waiting = False  # a reconnect from now on queues another (this one may bind too early)
                before = s.pipelines.bound_to if s.pipelines is not None else None
                await self._bind_now(s, streams)
                pipes, inlet = s.pipelines, self.link.inlet
                if (pipes is not None and inlet is not None and pipes.bound_to and s.live
                        and (backfill_gap or before not in (None, pipes.bound_to))):
                    await backfill.after_rebind(pipes, inlet, f"{self.who} {s.id}", self.settings.api_key)
                    if pipes.index_ids() != s.record.get("indexes"):  # the replaced ones' gap is covered
                        s.record["indexes"] = pipes.index_ids()
                        self.store.save(s.record)
                if pipes is not None and (pipes.backfill_due or pipes.rebind_due(s.lifecycle.state)) and s.live \
                        and s.id not in self._backfill_retries:
                    self._backfill_retries.add(s.id)
                    self._spawn(self._backfill_again(s, pipes.retry_delay(self.opts.status_poll_interval)))
        finally:
            if held and self.link.inlet is not None:
                self.link.inlet.release()

    async def _backfill_again(self, s: ManagedSession, delay: float) -> None:
        """A backfill or a bind call failed (VideoDB 5xx, network): try again after `status_poll_interval`, and so
        on until it works or the session ends (a failed bind makes again the calls that failed while the session is
        active, then backfills); `delay`: longer when VideoDB answered 429 with a longer Retry-After. Before, a failed
        backfill waited for the next reconnect, which may never come, and a pipeline whose re-bind call failed
        kept sending to the old connection."""
        await asyncio.sleep(delay)
        self._backfill_retries.discard(s.id)
        pipes = s.pipelines
        if s.live and pipes is not None and pipes.take_retry(s.lifecycle.state):
            await self._bind(s, pipes.streams, backfill_gap=True)

    async def _bind_now(self, s: ManagedSession, streams: list[Stream] | None) -> None:
        """Bind the AI pipelines to the current connection id (again, if it changed meanwhile)."""
        if not s.live:
            return
        if streams is None:
            session = await self._fetch(s)
            if session is None:
                return
            streams = _streams_of(session)
        if s.pipelines is None:
            s.pipelines = AIPipelines(self.conn, s.on_active, f"{self.who} {s.id}", self.settings.api_key,
                                      self.opts.callback_url)
            s.pipelines.adopt_indexes(self.conn, s.record.get("indexes"))  # a crashed run's: stopped once replaced
            s.pipelines.on_index = partial(_save_indexes, self.store, s)  # no closure cells, no bound method
        pipes = s.pipelines
        pipes.streams = streams
        self._learn_streams(s, streams)
        while s.live and s.lifecycle.state == "active" and pipes.due(conn_id := self.link.connection_id):
            before = pipes.errors  # (one VideoDB stopped gets no transcript or index on its stopped rtstreams)
            await pipes.bind(str(conn_id))
            self.stats.errors += pipes.errors - before
        if pipes.bound_to:
            s.record["ws_connection_id"] = pipes.bound_to
            s.record["indexes"] = pipes.index_ids()
        self.store.save(s.record)

    async def _on_connection(self, conn_id: str) -> None:
        """SessionLink listener: the source (re)connected; re-bind every live, bound session that is active, and
        backfill each one's gap (a session VideoDB stopped meanwhile is backfilled only: before, it was bound
        again, transcripts and indexes started on its stopped rtstreams)."""
        inlet = self.link.inlet
        for s in self.sessions.values():
            if s.live and s.pipelines is not None and s.pipelines.bound_to not in (None, conn_id) \
                    and not s.rebind_waiting:  # one queued re-bind binds to whatever connection is current then
                s.rebind_waiting = True
                if inlet is not None:
                    inlet.hold()  # now, before the new connection's first event is accepted
                self._spawn(self._bind(s, s.pipelines.streams, backfill_gap=True, held=inlet is not None))
        if any(not s.lifecycle.done for s in self.sessions.values()):  # stopped ones too: not ended yet
            self._start_poll()

    async def _checkpoints(self, inlet: Any) -> None:
        """Save where a restart's backfill starts: one period behind the source (a sink may not have flushed),
        and before the oldest event a sink holds only in memory (a parquet file not yet complete)."""
        taken = Checkpoints(margin=CHECKPOINT_EVERY / 2)
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            now = time.monotonic()
            taken.add(now, inlet.checkpoint())
            safe = taken.safe(now, self.link.held_since())
            if safe is not None and safe != self._saved_checkpoint:
                self.store.write_json(CHECKPOINT_FILE, safe)
                self._saved_checkpoint = safe

    async def _watch_store(self) -> None:
        """Look whether `sessions/` was removed or replaced, also while nothing is written (see _save_all_again)."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            self.store.check()

    def _save_all_again(self) -> None:
        """`sessions/` was removed or replaced while running: later writes made it again, but a restart knew
        nothing of the sessions whose records were not saved since. Every record held in memory is saved again."""
        log.warning("%s: %s was removed or replaced while running; writing the %d session record(s) held in "
                    "memory again", self.who, self.store.dir, len(self.sessions))
        for s in self.sessions.values():
            self.store.save(s.record)
        if self._saved_checkpoint is not None:
            self.store.write_json(CHECKPOINT_FILE, self._saved_checkpoint)

    def _start_poll(self) -> None:
        """Lifecycle events may still go to an old connection: poll every session's status too."""
        if self._poll is None or self._poll.done():
            self._poll = self._spawn(self._poll_status())

    async def _poll_status(self) -> None:
        """One `list_capture_sessions` call per interval covers every session, however many."""
        while any(not s.lifecycle.done for s in self.sessions.values()):
            await asyncio.sleep(self.opts.status_poll_interval)
            try:
                listed = await self._sdk("list_capture_sessions", self.conn.list_capture_sessions,
                                         self.settings.collection_id)
            except VideoDBCallError as exc:
                log.warning("%s", exc)
                continue
            seen: set[str] = set()
            for session in listed:
                s = self.sessions.get(str(getattr(session, "id", "")))
                status = reported_status(session)
                if s is not None:
                    seen.add(s.id)
                if s is None or not status or not s.lifecycle.behind(status):
                    continue
                if status in ("stopped", "exported", "failed") and self._poll_seen.get(s.id) != status:
                    self._poll_seen[s.id] = status  # give the WebSocket event one interval to arrive first
                    continue
                self._transition(s, status, session=session, error="reported by list_capture_sessions")
            self._check_unlisted(seen)

    def _check_unlisted(self, listed: set[str]) -> None:
        """A session not ended that two listings in a row left out is asked for by id; a 404 ends it as
        failed (else it stayed live for ever: polled, counted under max_sessions, re-attached by every
        restart). The listing alone is not trusted to be complete."""
        absent = self._unlisted
        for sid, s in self.sessions.items():
            if s.lifecycle.done or sid in listed:
                absent.pop(sid, None)
            else:
                absent[sid] = absent.get(sid, 0) + 1
                if absent[sid] == 2:
                    self._spawn(self._end_if_gone(s))
        for sid in [sid for sid in absent if sid not in self.sessions]:
            del absent[sid]

    async def _end_if_gone(self, s: ManagedSession) -> None:
        try:
            async with self.checking:  # a listing can leave out thousands: one call each, not all at once
                if s.lifecycle.done:
                    return
                await self._sdk("get_capture_session", self.conn.get_capture_session, s.id,
                                self.settings.collection_id)
        except VideoDBCallError as exc:
            if exc.status == 404 and not s.lifecycle.done:
                self._transition(s, "failed", error=f"capture session {s.id} no longer exists at VideoDB ({exc})")
            return
        self._unlisted.pop(s.id, None)  # it exists: the listing left it out

    def closing(self) -> None:
        """Shutdown begins: creates still waiting for a connection answer 503 now."""
        self.creator.closing.set()

    async def close(self) -> None:
        await self.creator.close()
        await self._background.cancel_all()
        await self.store.close()  # the records still queued, then nothing more is saved


def _streams_of(session: Any) -> list[Stream]:
    """Streams of a `CaptureSession` (its rtstreams carry the SDK channel type and media types)."""
    out = []
    for r in (getattr(session, "rtstreams", None) or [])[:MAX_STREAMS]:
        if not usable_id(getattr(r, "id", None)):
            continue
        kind = media_kind(getattr(r, "media_types", None), getattr(r, "channel_id", None), getattr(r, "name", None))
        out.append(of_sdk(r, kind))
    return out


def _save_indexes(store: SessionStore, s: ManagedSession, ids: list[dict[str, str]]) -> None:
    """A bind created an index: saved at once with those it has not stopped yet (a crash may come next)."""
    s.record["indexes"] = ids
    store.save(s.record)


def _backfill_marks(s: ManagedSession) -> dict[str, int]:
    """For each channel the session's AI pipelines produce: backfill from the session's creation."""
    created = iso_seconds(s.record.get("created_at"))
    if created is None:
        return {}
    ms = int(created * 1000)
    spec = s.on_active
    out = {}
    for r in s.record.get("rtstreams") or []:
        rid, kinds = r.get("rtstream_id"), r.get("media_types") or []
        if not isinstance(rid, str):
            continue
        channels = ((["transcript"] if spec.transcript else []) + (["audio_index"] if spec.index_audio else [])
                    if "audio" in kinds else ["visual_index"] if "video" in kinds and spec.index_visuals else [])
        out.update({f"{rid} {ch}": ms for ch in channels})
    return out


def fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of a create request, to refuse an Idempotency-Key reused for another body."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _token_allowed(s: ManagedSession) -> None:
    """409 for a session that has ended or was stopped through the API: it gets no new client token."""
    if s.lifecycle.done:
        raise ApiProblem(409, f"capture session {s.id} is {s.lifecycle.state}: no new token")
    if not s.live:
        raise ApiProblem(409, f"capture session {s.id} was stopped through the API: no new token")


def _mask_token(s: ManagedSession) -> None:
    """The client tokens of a session not finished are masked (a restart's too, not only those made in this
    process); one stopped before it started may still be started with them."""
    if not s.lifecycle.done:
        session_tokens.mask(s.record)


def _forget_token(s: ManagedSession) -> None:
    """Masking stays bounded by the sessions that may still run, not by every session a long run ever made."""
    session_tokens.forget(s.record)

"""Creating capture sessions for the session API: limits, Idempotency-Keys, and a create that outlives its request.

Why its own module: a create is the one operation that must survive what happens to its
HTTP request (a shutdown, a lost answer, a kill -9 mid-call), so it carries its own state:
the creates in flight, those already at VideoDB, and the intent files a retry reads.
The registry it adds sessions to is the `SessionManager`'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final

from pipeline import sdk_threads, secrets
from pipeline.events import iso_ts, lifecycle_status
from pipeline.videodb_sdk import CALL_DEADLINE, VideoDBCallError, client_token
from stages.controller import lost_create
from stages.controller.ai_pipelines import OnActive
from stages.controller.session_store import safe_id
from stages.controller.sessions import ManagedSession

if TYPE_CHECKING:
    from stages.controller.session_manager import SessionManager

log = logging.getLogger("pipeline.controller.sessions")

CLOSE_WAIT: Final = 30.0  # seconds a shutdown waits for creates already at VideoDB (to save their records)
#: `Retry-After` of a 503 for a VideoDB 429: VideoDB's own, bounded to this range, else the default (seconds).
RETRY_AFTER_MIN: Final = 1
RETRY_AFTER_MAX: Final = 300
RETRY_AFTER_DEFAULT: Final = 5
#: `Retry-After` of a 503 of our own (no WebSocket connection yet, shutting down): seconds.
RETRY_AFTER_SOON: Final = 2
#: SDK worker threads the creates leave to everything else (a stop, a new client token, the background work):
#: creates VideoDB is slow to make held every thread, and a user's stop waited behind them
THREADS_LEFT: Final = 2
#: seconds a create waits for its turn (as long as a call may wait for a worker thread): then 503
TURN_WAIT = CALL_DEADLINE


class ApiProblem(Exception):
    """A request the API refuses: HTTP status plus a one-line message (`retry_after`: seconds, sent as a
    `Retry-After` header)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def videodb_problem(exc: VideoDBCallError, message: str | None = None) -> ApiProblem:
    """Our answer to a failed VideoDB call: 502, or 503 with `Retry-After` when VideoDB rate-limited us (429)
    or said when it would take the call again (503 with `Retry-After`): our client should come back later,
    nothing is wrong with the request or with us (before, a 503 with `Retry-After` was answered 502)."""
    text = message or str(exc)
    asked = exc.retry_after
    if exc.status != 429 and not (exc.status == 503 and asked is not None):
        return ApiProblem(502, text)
    # bounded before rounding: 400 digits read as infinity, which math.ceil() cannot take
    wait = RETRY_AFTER_DEFAULT if asked is None else max(RETRY_AFTER_MIN, math.ceil(min(RETRY_AFTER_MAX, asked)))
    why = "rate-limiting" if exc.status == 429 else "busy"
    return ApiProblem(503, f"{text}; VideoDB is {why}, retry in {wait}s", retry_after=wait)


class SessionCreator:
    """The create path of one `SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager
        self.pending: dict[str, asyncio.Future[ManagedSession]] = {}  # creates in flight, by key
        self.creating = 0  # creates in flight (each holds a place under max_sessions until it returns)
        self.at_videodb: set[asyncio.Task[ManagedSession]] = set()  # creates past the connection wait
        self.closing = asyncio.Event()  # set at shutdown: creates still waiting for a connection get 503
        #: creates making their token or session at VideoDB at once (the others wait here, not for a thread)
        self.slots = asyncio.Semaphore(max(1, sdk_threads.workers() - THREADS_LEFT))

    async def create(self, end_user_id: str, metadata: dict[str, Any], on_active: OnActive | None,
                     key: str | None, fingerprint: str) -> tuple[ManagedSession, bool]:
        """(session, created now). A known Idempotency-Key returns its session (same request only)."""
        if key is not None:
            known = self._in_memory(key)
            if known is None and key in self.m.forgotten_keys:
                # read in a thread: a create with this key may have been made (or finished) meanwhile
                known = await self.m._forgotten(key) or self._in_memory(key)
            if known is not None:
                return self._same_request(known, fingerprint), False
            pending = self.pending.get(key)
            if pending is not None:
                return self._same_request(await asyncio.shield(pending), fingerprint), False
        live = sum(1 for s in self.m.sessions.values() if s.live) + self.creating
        if live >= self.m.opts.api.max_sessions:
            raise ApiProblem(429, f"{live} live sessions: the limit is api.max_sessions={self.m.opts.api.max_sessions}")
        fut: asyncio.Future[ManagedSession] = asyncio.get_running_loop().create_future()
        if key is not None:
            self.pending[key] = fut
        self.creating += 1
        try:
            s = await self._made_before(key, fingerprint) if key is not None else None
            replayed = s is not None
            if s is None:
                s = await self._create(end_user_id, metadata, on_active, key, fingerprint)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            self.creating -= 1
            if key is not None:
                self.pending.pop(key, None)
        fut.set_result(s)
        return s, not replayed

    def _in_memory(self, key: str) -> ManagedSession | None:
        sid = self.m.idempotency.get(key)
        return self.m.sessions.get(sid) if sid is not None else None

    @staticmethod
    def _same_request(s: ManagedSession, fingerprint: str) -> ManagedSession:
        if s.record.get("request_hash") not in (None, fingerprint):
            raise ApiProblem(409, "this Idempotency-Key was used for a different request body")
        return s

    async def _create(self, end_user_id: str, metadata: dict[str, Any], on_active: OnActive | None,
                      key: str | None, fingerprint: str) -> ManagedSession:
        conn_id = await self._connection_for_create()
        await self._slot()
        task: asyncio.Task[ManagedSession] | None = None
        try:
            try:
                record = await self._prepare(conn_id, end_user_id, metadata, on_active, key, fingerprint)
            except asyncio.CancelledError:  # a shutdown: nothing was made, its note (if written) must not find one
                if key is not None:
                    self.m.store.drop_intent(key)
                raise
            if self.closing.is_set():  # the stop began while its token was made or its note written: nothing made
                secrets.forget(record["client_token"])
                if key is not None:
                    self.m.store.drop_intent(key)
                raise ApiProblem(503, f"the pipeline is shutting down; retry in {RETRY_AFTER_SOON}s",
                                 retry_after=RETRY_AFTER_SOON)
            # From here on the create runs to its end even if the request is cancelled (a shutdown): a session
            # VideoDB made must get its record, or a restart would not know it and a retry would make another.
            # (Not before: a shutdown waits for these, up to CLOSE_WAIT, and a note held up by a slow disk is no
            # session at VideoDB.)
            task = asyncio.get_running_loop().create_task(self._create_at_videodb(record, on_active))
            self.at_videodb.add(task)
            task.add_done_callback(self.at_videodb.discard)
            task.add_done_callback(lambda _: self.slots.release())  # its place is free once VideoDB answered
        finally:
            if task is None:
                self.slots.release()
        s = await asyncio.shield(task)
        # its 201 only once a restart would know it (a failed write is logged). Not in the task: a shutdown waits
        # CLOSE_WAIT for creates at VideoDB, not for a slow disk (the stop writes the queued records itself)
        await self.m.store.flushed(s.id)
        return s

    async def _slot(self) -> None:
        """A place among the creates at VideoDB at once; 503 at once when shutting down, and after the SDK's call
        deadline without one (as a call waiting that long for a worker thread failed before)."""
        acquire = asyncio.ensure_future(self.slots.acquire())
        closing = asyncio.ensure_future(self.closing.wait())
        got = False
        try:
            await asyncio.wait((acquire, closing), timeout=TURN_WAIT,
                               return_when=asyncio.FIRST_COMPLETED)
            got = acquire.done() and not acquire.cancelled() and not self.closing.is_set()
        finally:
            closing.cancel()
            if not got:
                if acquire.done() and not acquire.cancelled():
                    self.slots.release()
                else:
                    acquire.cancel()
        if got:
            return
        if self.closing.is_set():
            raise ApiProblem(503, f"the pipeline is shutting down; retry in {RETRY_AFTER_SOON}s",
                             retry_after=RETRY_AFTER_SOON)
        raise ApiProblem(503, f"VideoDB has not made the sessions of the creates before this one for "
                              f"{TURN_WAIT:g}s; retry in {RETRY_AFTER_DEFAULT}s",
                         retry_after=RETRY_AFTER_DEFAULT)

    async def _connection_for_create(self) -> str:
        """The current connection id; 503 after connect_timeout without one, or at once when shutting down."""
        closing = f"the pipeline is shutting down; retry in {RETRY_AFTER_SOON}s"
        if self.closing.is_set():
            raise ApiProblem(503, closing, retry_after=RETRY_AFTER_SOON)
        waits = [asyncio.ensure_future(self.m.link.wait_connection()), asyncio.ensure_future(self.closing.wait())]
        try:
            await asyncio.wait(waits, timeout=self.m.opts.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.closing.is_set():
            raise ApiProblem(503, closing, retry_after=RETRY_AFTER_SOON)
        if not waits[0].done() or waits[0].cancelled():
            raise ApiProblem(503, f"no WebSocket connection to VideoDB yet; retry in {RETRY_AFTER_SOON}s",
                             retry_after=RETRY_AFTER_SOON)
        return waits[0].result()

    async def _prepare(self, conn_id: str, end_user_id: str, metadata: dict[str, Any], on_active: OnActive | None,
                       key: str | None, fingerprint: str) -> dict[str, Any]:
        """The new session's record, its client token made and (with a key) its intent note on disk."""
        opts = self.m.opts
        metadata = {**opts.metadata, **metadata}  # the configured metadata applies to every session
        try:  # the token first: it names no session, so if it fails no session is left behind at VideoDB
            token = await client_token(self.m.who, self.m.conn, opts.client_token_expires_in,
                                       self.m.settings.api_key)
        except VideoDBCallError as exc:
            self.m.stats.errors += 1
            raise videodb_problem(exc) from None
        now = time.time()
        record: dict[str, Any] = {
            "session_id": None, "collection_id": self.m.settings.collection_id, "end_user_id": end_user_id,
            "metadata": metadata, "status": "created", "ws_connection_id": conn_id, "created_on": conn_id,
            "client_token": token, "expires_at": iso_ts(now + opts.client_token_expires_in),
            "created_at": iso_ts(now), "stop_requested": False,
            "on_active": on_active.model_dump(exclude_none=True) if on_active is not None else None,
            "idempotency_key": key, "request_hash": fingerprint}
        # until the record is saved: a crash or a lost answer can be told from it later. Without it, a retry after
        # a restart could not find the session this create made and would make a second one: nothing is made
        if key is not None and not await self.m.store.save_intent(record):
            self.m.stats.errors += 1
            secrets.forget(token)  # handed to nobody
            raise ApiProblem(503, f"cannot save the state of this create (Idempotency-Key): nothing was made; "
                             f"retry in {RETRY_AFTER_DEFAULT}s", retry_after=RETRY_AFTER_DEFAULT)
        return record

    async def _create_at_videodb(self, record: dict[str, Any], on_active: OnActive | None) -> ManagedSession:
        conn_id, end_user_id, metadata = record["ws_connection_id"], record["end_user_id"], record["metadata"]
        key, token = record["idempotency_key"], record["client_token"]
        try:
            session = await self.m._sdk("create_capture_session", self.m.conn.create_capture_session,
                                      end_user_id=end_user_id, collection_id=self.m.settings.collection_id,
                                      ws_connection_id=conn_id, metadata=metadata or None,
                                      callback_url=self.m.opts.callback_url)
        except VideoDBCallError as exc:
            self.m.stats.errors += 1
            secrets.forget(token)  # no session holds it (a retry that finds the one VideoDB made masks it again)
            if key is not None and exc.fatal:  # refused (4xx): VideoDB made nothing; else it may have
                self.m.store.drop_intent(key)
            raise videodb_problem(exc) from None
        if not safe_id(str(session.id)):
            secrets.forget(token)
            raise ApiProblem(502, f"VideoDB returned an unusable session id {str(session.id)[:80]!r}")
        record["session_id"] = session.id
        s = self.m._keep(record, getattr(session, "status", None))
        log.info("%s: capture session %s created for end user %r", self.m.who, s.id, end_user_id)
        for event in self.m._early.pop(s.id, []):  # lifecycle events that arrived before this call returned
            s.counts["capture_session"] = s.counts.get("capture_session", 0) + 1
            status = lifecycle_status(event)
            if status is not None and s.lifecycle.behind(status):
                self.m._lifecycle_event(s, event, status)
        if self.m.link.connection_id != conn_id:  # reconnected meanwhile: events went to the old id
            self.m._start_poll()
        return s

    async def _made_before(self, key: str, fingerprint: str) -> ManagedSession | None:
        """The session an earlier try with `key` asked VideoDB for, when that try never learnt its id.

        A crash (even kill -9) or a lost answer after `create_capture_session` reached VideoDB: the
        intent saved before the call is still there. The session is found among the collection's
        sessions (still `created`: nobody has its token; same end user and metadata; no record here)
        and kept, so a retry does not make a second one.
        """
        intent = self.m.store.load_intent(key)
        if intent is None:
            return None
        if intent.get("request_hash") not in (None, fingerprint):
            raise ApiProblem(409, "this Idempotency-Key was used for a different request body")
        try:
            listed = await self.m._sdk("list_capture_sessions", self.m.conn.list_capture_sessions,
                                     self.m.settings.collection_id)
        except VideoDBCallError as exc:  # cannot tell whether that session exists: do not make another
            self.m.stats.errors += 1
            raise videodb_problem(exc) from None
        if self.at_videodb:  # a create under way may have made a listed session it has not kept yet: never take
            await asyncio.wait(set(self.at_videodb))  # it for ours (both callers were handed that one session)
        found = lost_create.candidates(
            listed, intent.get("end_user_id"), intent.get("metadata"),
            lambda sid: sid in self.m.sessions or self.m.store.has(sid))
        if len(found) != 1:
            if found:
                log.warning("%s: Idempotency-Key %r: %d sessions at VideoDB could be the one an earlier try made; "
                            "creating a new one", self.m.who, key, len(found))
            self.m.store.drop_intent(key)
            return None
        s = self.m._keep({**intent, "session_id": str(found[0].id)}, "created")
        log.info("%s: capture session %s, made by an earlier try with Idempotency-Key %r whose answer was lost, "
                 "kept", self.m.who, s.id, key)
        if self.m.link.connection_id != s.record.get("ws_connection_id"):
            self.m._start_poll()  # its lifecycle events go to the connection it was created on
        await self.m.store.flushed(s.id)
        return s

    async def close(self) -> None:
        """Shutdown: no new creates; those already at VideoDB get CLOSE_WAIT to save their records."""
        self.closing.set()
        if self.at_videodb:  # their sessions may exist at VideoDB already: let them save their records
            done, late = await asyncio.wait(self.at_videodb, timeout=CLOSE_WAIT)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved (an ApiProblem its client no longer waits for)
            if late:
                log.warning("%s: %d session create(s) still waiting for VideoDB after %gs at shutdown; a session "
                            "VideoDB makes for them has no record here", self.m.who, len(late), CLOSE_WAIT)

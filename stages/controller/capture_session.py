"""Controller `capture_session`: creates (or attaches to) a VideoDB capture session and drives it.

Once the source has a WebSocket connection id: create the session bound to it,
generate a client token for the desktop client and save both to
`<state_dir>/capture_session.json` (0600). Then follow the lifecycle events:
on `active` start what `on_active` asks on the session's rtstreams, re-bind
them after every reconnect and backfill the gap (`rebind_then_backfill`), and
end the pipeline on `exit_on` (exit 0, once what was produced before it is in)
or on `failed` (exit 3). The SDK is synchronous, so every call runs in a thread and
`observe()` only schedules work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, model_validator

from pipeline import secrets, state
from pipeline.api import Batch, Context, Controller, Event, Options
from pipeline.errors import StageError
from pipeline.events import iso_ts, lifecycle_status
from pipeline.files import write_private_text
from pipeline.termsafe import visible
from pipeline.types import Duration
from pipeline.videodb_sdk import VideoDBCallError, VideoDBSettings, call, client_token, connect
from stages.controller import lost_create, resume
from stages.controller.ai_pipelines import AIPipelines, OnActive, retry_wait, streams_from_event, streams_from_session
from stages.controller.checkpoints import Checkpoints
from stages.controller.ended_backfill import fetch_ended
from stages.controller.lifecycle import STATES, Lifecycle, ended_unstored, export_wait, reported_status
from stages.controller.session_options import SessionApiOptions
from stages.controller.session_store import safe_id
from stages.controller.tasks import Background
from stages.sources import backfill

log = logging.getLogger("pipeline.controller.capture_session")

STATE_FILE = "capture_session.json"
_EXIT_STATES = ("stopped", "exported")
SETTLE_TIMEOUT = 60.0  # longest an exit waits for a re-bind/backfill still under way
CHECKPOINT_EVERY = 2.0  # seconds between saves of where a restart's backfill starts (> sinks' flush)
MAX_ERROR = 1000  # characters of a failed session's error kept (it comes off the wire)


class CaptureSessionOptions(Options):
    end_user_id: str | None = Field(default=None, description="who is capturing; required unless session_id")
    collection_id: str | None = Field(default=None, description="default: videodb.collection_id")
    metadata: dict[str, Any] = Field(default_factory=dict, description="stored with the session")
    callback_url: str | None = Field(default=None, description="VideoDB also POSTs session/alert events here")
    session_id: str | None = Field(default=None, description="attach to this existing session instead of creating")
    client_token_expires_in: int = Field(default=86400, ge=1, description="seconds the desktop client token lives")
    state_dir: str | None = Field(default=None, description="where capture_session.json goes "
                                                            "(default: the pipeline's state_dir)")
    on_active: OnActive = Field(default_factory=OnActive, description="AI pipelines to start once active")
    exit_on: Literal["exported", "stopped", "none"] = Field(default="exported",
                                                           description="end the pipeline after this event")
    connect_timeout: Duration = Field(default=60.0, description="how long to wait for the source's connection id")
    status_poll_interval: Duration = Field(  # 0 polled as fast as VideoDB answered (1,000 calls a second)
        default=5.0, gt=0, description="after a reconnect or when attached, poll the session status this often")
    silent_check_interval: Duration = Field(
        default=60.0, gt=0, le=86400,
        description="when the session sent no event for this long, ask VideoDB for its status (its lifecycle "
                    "events can be lost while the WebSocket stays up)")
    export_timeout: Duration = Field(
        default=1800.0, gt=0, le=7 * 86400,
        description="with exit_on: exported, how long after `stopped` the export may take before the run "
                    "ends with exit code 3; with api, before the session ends as failed")
    api: SessionApiOptions | None = Field(
        default=None, description="serve the session API: sessions come from it, none is created at start")

    @model_validator(mode="after")
    def _need_user(self) -> CaptureSessionOptions:
        if self.api is not None:
            if self.session_id:
                raise ValueError("session_id and api exclude each other (with api, sessions come from the API)")
            return self
        if not self.end_user_id and not self.session_id:
            raise ValueError("set end_user_id (to create a session) or session_id (to attach to one)")
        return self


class CaptureSessionController(Controller):
    """Creates/attaches a capture session, starts its AI pipelines, ends the run on export or failure."""

    name = "capture_session"
    Options = CaptureSessionOptions

    def __init__(self, options: Any, context: Context) -> None:
        super().__init__(options, context)
        self.settings = VideoDBSettings.resolve(context.settings, collection_id=options.collection_id)
        self.who = context.stage or self.name
        self.state_file = Path(options.state_dir or context.state_dir).expanduser() / STATE_FILE
        self.session_id: str | None = None
        self.lifecycle = Lifecycle()
        self.pipelines: AIPipelines | None = None
        self._locked = False  # its own state_dir, locked at start (released at close)
        self.record: dict[str, Any] = {}
        self._conn: Any = None
        self._early: list[Event] = []
        self._background = Background(self.who, context.stats, log)
        self._spawn = self._background.spawn
        self._bind_lock = asyncio.Lock()
        self._retrying = False  # a bind or backfill that failed is queued to run again
        self._poll: asyncio.Task[None] | None = None
        self._poll_seen: str | None = None
        self._events_lost = False  # lifecycle events may have gone to a dropped connection (polling stands in)
        self._resumed = False
        self._heard = time.monotonic()  # when the last event came (or the last silent check was made)
        self._stopped_at: str | None = None  # when the session was first seen stopped (ISO, saved)
        self.manager: Any = None  # SessionManager when `api` is set
        self.api: Any = None
        # Read now, before any sink starts: a sink with `clear` must not empty a resumed session's output.
        self._found = None if options.session_id or options.api is not None else resume.read_record(
            self.state_file, context.settings, self.who)
        self._saved = resume.saved_session(self._found, self.settings.collection_id, options.end_user_id, self.who,
                                           awaiting_export=options.exit_on == "exported")
        context.session.resuming = self._saved is not None or resume.pending_create(
            self._found, self.settings.collection_id, options.end_user_id) is not None

    async def _sdk(self, what: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await call(self.who, what, fn, *args, api_key=self.settings.api_key, **kwargs)

    # --- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        if opts.state_dir:  # its own: locked as the pipeline's is (two runs must not resume the same sessions)
            self._locked = state.lock_also(self.state_file.parent)
            if self._locked:
                self._spawn(state.guard(self.state_file.parent))  # made again if the directory is removed
        self._conn = await asyncio.to_thread(connect, self.settings, self.who)
        if opts.api is not None:
            await self._start_api()
            return
        self.pipelines = AIPipelines(self._conn, opts.on_active, self.who, self.settings.api_key,
                                     opts.callback_url)
        self.pipelines.on_index = self._save_indexes
        try:
            conn_id = await asyncio.wait_for(self.context.session.wait_connection(), opts.connect_timeout)
        except TimeoutError:
            raise StageError(f"{self.who}: no WebSocket connection id from the source after "
                             f"{opts.connect_timeout:g}s (the controller needs source type videodb)") from None
        found = None if self.context.settings.get("new_session") else self._found
        collection = self.settings.collection_id
        saved = None if found is None else self._saved
        intent = resume.pending_create(found, collection, opts.end_user_id)
        session, made = None, None
        if opts.session_id:
            session = await self._attach(opts.session_id)
        elif saved is not None:
            session = await self._resume(saved)
        elif intent is not None:
            session = await self._find_lost_create(intent)
            made = intent if session is not None else None
        fresh = session is None
        if session is None:
            session, made = await self._create(conn_id)
        now = time.time()
        self.record = {"session_id": self.session_id, "collection_id": collection,
                       "end_user_id": getattr(session, "end_user_id", None) or opts.end_user_id,
                       "ws_connection_id": conn_id, "status": self.lifecycle.state,
                       "client_token": None, "expires_in": opts.client_token_expires_in,
                       "expires_at": iso_ts(now + opts.client_token_expires_in), "created_at": iso_ts(now)}
        if self._resumed and saved is not None and saved.get("backfill_from"):
            self.record["backfill_from"] = saved["backfill_from"]  # until this run saves its own
        if self.lifecycle.state in _EXIT_STATES:  # resumed while its export was awaited
            self.record["stopped_at"] = self._stopped_at
            if getattr(session, "exported_video_id", None):
                self.record["exported_video_id"] = session.exported_video_id
        kept = saved if self._resumed else made  # a token made before: the desktop client may be using it
        token = made["client_token"] if fresh and made else resume.reusable_token(kept)
        if token is not None and kept is not None:
            self.record.update({k: kept.get(k) for k in ("expires_in", "expires_at", "created_at")})
            if kept is saved:
                self.record["resumed_at"] = iso_ts(now)
        else:
            token = await client_token(self.who, self._conn, opts.client_token_expires_in, self.settings.api_key)
        if token:
            secrets.register(str(token))
        self.record["client_token"] = token
        self.record["indexes"] = self.pipelines.index_ids()  # the re-bind may have finished already
        self._save()
        log.info("%s: capture session %s ready; start the desktop capture client with the client token in %s: "
                 "CaptureClient(client_token=...).start_capture_session(capture_session_id=%r, channels=...)",
                 self.who, self.session_id, self.state_file, self.session_id)
        self.context.session.capture_session_id = self.session_id
        self.context.session.on_connection(self._on_connection)
        if self.context.session.inlet is not None:
            self._spawn(self._checkpoints(self.context.session.inlet))
        self._spawn(self._check_silence())
        if opts.session_id or self._resumed or (made is not None and made.get("ws_connection_id") != conn_id):
            self._start_poll()  # lifecycle events go to the connection the session was created with
        elif self.context.session.connection_id != conn_id:
            self._on_reconnect()

    async def _create(self, conn_id: str) -> tuple[Any, dict[str, Any]]:
        """A new session, and the record noted before the call (its client token).

        The token comes first (it names no session: if it fails, nothing is left at VideoDB), then
        the record is saved with status `creating` and no session id, then the session is made and
        saved at once: a crash (even kill -9) while the create runs leaves that note, and the
        restart looks for the session it made (`_find_lost_create`) instead of making another.
        """
        opts = self.options
        token = await client_token(self.who, self._conn, opts.client_token_expires_in, self.settings.api_key)
        now = time.time()
        self.record = {"session_id": None, "collection_id": self.settings.collection_id,
                       "end_user_id": opts.end_user_id, "metadata": opts.metadata, "status": resume.CREATING,
                       "ws_connection_id": conn_id, "client_token": token,
                       "expires_in": opts.client_token_expires_in,
                       "expires_at": iso_ts(now + opts.client_token_expires_in), "created_at": iso_ts(now)}
        if token:
            secrets.register(str(token))
        self._save()
        made = dict(self.record)
        session = await self._sdk("create_capture_session", self._conn.create_capture_session,
                                  end_user_id=opts.end_user_id, collection_id=self.settings.collection_id,
                                  ws_connection_id=conn_id, metadata=opts.metadata or None,
                                  callback_url=opts.callback_url)
        if not isinstance(session.id, str) or not safe_id(session.id):
            raise StageError(f"{self.who}: create_capture_session returned an unusable session id "
                             f"{str(session.id)[:80]!r}")
        self.record.update(session_id=session.id, status="created")
        self._save()
        self.session_id = session.id
        self.lifecycle = Lifecycle(session.id)
        self.lifecycle.advance(getattr(session, "status", None) or "created")
        self._replay_early()
        return session, made

    async def _find_lost_create(self, intent: dict[str, Any]) -> Any:
        """The session a crashed run's create made (its record never got the id), or None: see lost_create.py."""
        try:
            listed = await self._sdk("list_capture_sessions", self._conn.list_capture_sessions,
                                     self.settings.collection_id)
        except VideoDBCallError as exc:
            raise StageError(f"{exc}; {self.state_file} notes a create a crash cut short, so a new session is "
                             "not made before VideoDB says whether that one exists (run again, or use "
                             "--new-session)") from None
        found = lost_create.candidates(listed, intent.get("end_user_id"), intent.get("metadata"),
                                       lambda sid: False)
        if len(found) != 1:
            if found:
                log.warning("%s: %d capture sessions (%s) could be the one a crashed run was creating; creating "
                            "a new one", self.who, len(found), ", ".join(str(x.id) for x in found[:5]))
            else:
                log.info("%s: the create a crashed run noted in %s never reached VideoDB; creating a session",
                         self.who, self.state_file)
            return None
        log.warning("%s: capture session %s, made by a crashed run before it could save it, kept", self.who,
                    found[0].id)
        self._adopt(found[0])
        return found[0]

    async def _attach(self, session_id: str) -> Any:
        session = await self._sdk("get_capture_session", self._conn.get_capture_session,
                                  session_id, self.settings.collection_id)
        self._adopt(session)
        log.info("%s: attached to capture session %s", self.who, session.id)
        return session

    async def _resume(self, saved: dict[str, Any]) -> Any:
        """After a crash: attach to the session in capture_session.json if it is still live, else None."""
        sid = saved["session_id"]
        try:
            session = await self._sdk("get_capture_session", self._conn.get_capture_session,
                                      sid, self.settings.collection_id)
        except VideoDBCallError as exc:
            if not exc.fatal or exc.status in (401, 403):  # a 5xx, 429, timeout: the session may well be live
                raise StageError(f"{exc}; not creating a new capture session while the one saved in "
                                 f"{self.state_file} may be live (run again, or --new-session)") from None
            log.warning("%s; creating a new capture session", exc)  # refused (404...): VideoDB does not have it
            return None
        status = reported_status(session)
        awaited = saved.get("status") == "stopped" and status in _EXIT_STATES  # its export was awaited
        if status in resume.ENDED and not awaited:
            inlet = self.context.session.inlet
            if saved.get("status") == "active" and inlet is not None:  # ended while no run was up
                opts = self.options
                await fetch_ended(self._conn, opts.on_active, self.who, self.settings.api_key, opts.callback_url,
                                  inlet, session, saved, opts.status_poll_interval)
            log.info("%s: saved capture session %s is %s; creating a new one", self.who, sid, status)
            return None
        if awaited and isinstance(saved.get("stopped_at"), str):
            self._stopped_at = saved["stopped_at"]  # export_timeout runs from the first stop, not from here
        self._resumed = True
        if self.context.session.inlet is not None:  # backfill from where the crashed run had got to
            self.context.session.inlet.resume(saved.get("backfill_from"))
        assert self.pipelines is not None
        self.pipelines.adopt_indexes(self._conn, saved.get("indexes"))  # stopped once the re-bind replaced them
        log.warning("%s: resuming capture session %s (%s) from %s; its AI pipelines are re-bound to the new "
                    "connection (pipeline run --new-session starts a fresh session)",
                    self.who, sid, status, self.state_file)
        self._adopt(session)
        return session

    def _adopt(self, session: Any) -> None:
        self.session_id = session.id
        self.lifecycle = Lifecycle(session.id)
        self._transition(reported_status(session) or "created", session=session)
        self._replay_early()

    def _replay_early(self) -> None:
        """Lifecycle events that arrived before we knew the session id (no await since it was set)."""
        early, self._early = self._early, []
        for event in early:
            status = lifecycle_status(event)
            if status is not None and self.lifecycle.behind(status):
                self._lifecycle_event(event, status)

    # --- lifecycle -------------------------------------------------------------------------------

    async def _start_api(self) -> None:
        """`api` set: many sessions, created through the session API (see session_manager.py)."""
        from stages.controller.session_api import SessionApi
        from stages.controller.session_manager import SessionManager

        self.manager = SessionManager(self, self.state_file.parent)
        await self.manager.start(self._conn)
        self.api = SessionApi(self.manager, self.options.api, self.who)
        await self.api.start()

    def observe(self, batch: Batch) -> None:
        if self.manager is not None:
            self.manager.observe(batch)
            return
        if batch:
            self._heard = time.monotonic()
        for event in batch:
            if "event" in event:
                status = lifecycle_status(event)
                if status is not None:
                    self._lifecycle_event(event, status)

    def _lifecycle_event(self, event: Event, status: str) -> None:
        if self.session_id is None:
            if len(self._early) < 100:
                self._early.append(event)
            return
        sid = event.get("capture_session_id")
        if sid and sid != self.session_id:
            return
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        self._transition(status, event_data=data, error=data.get("error") or event.get("error"))

    def _transition(self, status: str, *, event_data: dict[str, Any] | None = None,
                    session: Any = None, error: Any = None) -> None:
        """Apply one status (from an event, or from polling/attaching) and act on it."""
        if not self.lifecycle.advance(status, polled=session is not None):
            return
        self.record["status"] = status
        data = event_data or {}
        if status == "active":
            rts = data.get("rtstreams")
            gap = True if self._resumed else None  # after a crash: backfill what the dead process missed
            if rts:
                self._spawn_rebind(streams_from_event(rts, self.settings.collection_id),
                                   backfill_gap=gap, hold=bool(gap))
            elif session is not None and getattr(session, "rtstreams", None):
                self._spawn_rebind(streams_from_session(session), backfill_gap=gap, hold=bool(gap))
            else:
                self._spawn_rebind(None, backfill_gap=gap, hold=bool(gap))
        elif status == "exported":
            if session is not None and not data:  # polled: the session carries the video id (not its URLs)
                data = {"exported_video_id": getattr(session, "exported_video_id", None)}
            self.record.update({k: data[k] for k in ("exported_video_id", "stream_url", "player_url") if data.get(k)})
        elif status == "stopped" and self.options.exit_on == "exported":
            self._stopped_at = self._stopped_at or iso_ts(time.time())
            self.record["stopped_at"] = self._stopped_at
            self._spawn(self._end_if_unstored(session, polled=session is not None))
            self._spawn(self._await_export())
        if self.record:
            self._save()
        if status == "failed":
            self.context.session.request_exit(3, f"capture session failed: {_error_text(error)}")
        elif (self.options.exit_on in _EXIT_STATES and status in _EXIT_STATES
              and STATES.index(status) >= STATES.index(self.options.exit_on)):
            self._spawn(self._exit_settled(status, polled=session is not None))
        if self.lifecycle.done and self._poll is not None:
            self._poll.cancel()

    async def _end_if_unstored(self, session: Any, *, polled: bool) -> None:
        """`stopped`, waiting for `exported`: a session none of whose channels is stored is never exported
        (VideoDB exports only stored recordings), so it ends here instead of running for ever."""
        if not await ended_unstored(self.lifecycle, self.record, session, lambda: self._sdk(
                "get_capture_session", self._conn.get_capture_session, self.session_id, self.settings.collection_id)):
            return
        self._save()
        if self._poll is not None:
            self._poll.cancel()
        log.info("%s: capture session %s stopped and none of its channels is stored: no export follows",
                 self.who, self.session_id)
        await self._exit_settled("stopped (no channel stored, so no export)", polled=polled)

    async def _await_export(self) -> None:
        """`stopped`, waiting for `exported`: VideoDB reports a failed export only in the session's
        `export_status` (no event follows), so the status is polled meanwhile (see `_poll_status`), and
        an export that has not come after `export_timeout` ends the run (it waited for ever before)."""
        self._start_poll(events_lost=False)
        await asyncio.sleep(export_wait(self._stopped_at, self.options.export_timeout, time.time()))
        if not self.lifecycle.done:
            self._export_failed(f"was not exported within export_timeout={self.options.export_timeout:g}s "
                                "of stopping")

    def _export_failed(self, why: str) -> None:
        if self.context.session.exit_requested:
            return
        self.record["error"] = why
        self._save()
        if self._poll is not None and self._poll is not asyncio.current_task():
            self._poll.cancel()
        log.error("%s: capture session %s stopped but %s", self.who, self.session_id, why)
        self.context.session.request_exit(3, f"capture session {self.session_id} stopped but {why}")

    def _save_indexes(self, ids: list[dict[str, str]]) -> None:
        """A bind made an index: saved at once (a crash before the bind ends must not leave it running)."""
        if self.record.get("session_id"):  # else start() saves the record, indexes included, once it has one
            self.record["indexes"] = ids
            self._save()

    def _save(self) -> None:
        try:
            write_private_text(self.state_file, orjson.dumps(self.record, option=orjson.OPT_INDENT_2).decode())
        except (StageError, OSError) as exc:
            log.error("%s: cannot save %s: %s", self.who, self.state_file, exc)

    # --- AI pipelines and reconnects -------------------------------------------------------------

    def _spawn_rebind(self, streams: list[Any] | None, *, backfill_gap: bool | None = None,
                      hold: bool = False) -> None:
        """Schedule `rebind_then_backfill`; `hold`: the source holds new live events until it is done."""
        inlet = self.context.session.inlet
        held = hold and inlet is not None
        if hold and inlet is not None:
            inlet.hold()  # now, before the new connection's first event is accepted
        self._spawn(self.rebind_then_backfill(streams, backfill_gap=backfill_gap, held=held))

    async def rebind_then_backfill(self, streams: list[Any] | None, *, backfill_gap: bool | None = None,
                                   held: bool = False) -> None:
        """The re-bind hook: bind every AI pipeline to the current connection, then backfill since last seen.

        `backfill_gap`: None = backfill when this was a re-bind (the pipelines had been bound
        before); True = always (after a restart, or before ending on a polled status).
        `held`: the source's inlet was put on hold for this call; released at the end, whatever happens.
        """
        assert self.pipelines is not None
        try:
            async with self._bind_lock:
                before = self.pipelines.bound_to
                if not await self._bind(streams, backfill_gap=backfill_gap):
                    return
                if backfill_gap or (backfill_gap is None and before is not None
                                    and before != self.pipelines.bound_to):
                    await self._backfill()
                if (self.pipelines.rebind_due(self.lifecycle.state) or self.pipelines.backfill_due) \
                        and not self._retrying and not self.lifecycle.done:
                    self._retrying = True
                    self._spawn(self._bind_again(self.pipelines.retry_delay(self.options.status_poll_interval)))
        finally:
            if held and self.context.session.inlet is not None:
                self.context.session.inlet.release()

    async def _bind_again(self, delay: float) -> None:
        """A bind call or a backfill failed (VideoDB 5xx, 429, network): try again after `status_poll_interval`,
        and so on until it works or the session ends (a failed bind makes again the calls that failed while the
        session is active, then backfills); `delay`: longer when VideoDB answered 429 with a longer Retry-After.
        Before, a pipeline whose re-bind call failed kept sending to the old connection, and a failed backfill
        waited for a reconnect that may never come: with the connection up, those events never arrived."""
        await asyncio.sleep(delay)
        self._retrying = False
        pipes = self.pipelines
        if pipes is not None and not self.lifecycle.done and pipes.take_retry(self.lifecycle.state):
            await self.rebind_then_backfill(pipes.streams, backfill_gap=True)

    async def _bind(self, streams: list[Any] | None, *, backfill_gap: bool | None = None) -> bool:
        """Bind all AI pipelines to the current connection id (again, if it changed meanwhile); False if no streams
        (`streams` None and VideoDB did not give them: asked again later unless it refused, see `_bind_later`)."""
        assert self.pipelines is not None
        if streams is None:
            try:
                session = await self._sdk("get_capture_session", self._conn.get_capture_session,
                                          self.session_id, self.settings.collection_id)
            except VideoDBCallError as exc:
                log.error("%s", exc)
                self.context.stats.errors += 1  # as the session API counts it
                if not exc.fatal and self.lifecycle.state == "active":
                    delay = retry_wait(self.options.status_poll_interval, exc.retry_after)
                    self._spawn(self._bind_later(delay, backfill_gap))
                return False
            streams = streams_from_session(session)
        self.pipelines.streams = streams
        while self.lifecycle.state == "active" and self.pipelines.due(conn_id := self.context.session.connection_id):
            before = self.pipelines.errors  # (once VideoDB stopped it, nothing starts on its rtstreams)
            await self.pipelines.bind(str(conn_id))
            self.context.stats.errors += self.pipelines.errors - before
        bound = self.pipelines.bound_to
        indexes = self.pipelines.index_ids()
        if bound and (bound != self.record.get("ws_connection_id") or indexes != self.record.get("indexes")):
            self.record["ws_connection_id"] = bound  # capture_session.json names the live connection
            self.record["indexes"] = indexes  # a restart stops these once it has bound its own
            self._save()
        return True

    async def _bind_later(self, delay: float, backfill_gap: bool | None) -> None:
        """Bind after `delay` a session whose rtstreams VideoDB did not give (a 5xx, 429, the network), while it is
        active and not bound meanwhile: before, its pipelines stayed unbound until a reconnect, if one came."""
        await asyncio.sleep(delay)
        pipes = self.pipelines
        if pipes is not None and self.lifecycle.state == "active" \
                and pipes.bound_to != self.context.session.connection_id:
            await self.rebind_then_backfill(None, backfill_gap=backfill_gap)

    async def _backfill(self) -> None:
        """Queue on the source what VideoDB produced since the last event seen per rtstream and channel."""
        inlet, pipelines = self.context.session.inlet, self.pipelines
        if inlet is not None and pipelines is not None:
            await backfill.after_rebind(pipelines, inlet, self.who, self.settings.api_key)
            if self.record.get("session_id") and pipelines.index_ids() != self.record.get("indexes"):
                self.record["indexes"] = pipelines.index_ids()  # the replaced ones' gap is covered
                self._save()

    async def _exit_settled(self, status: str, *, polled: bool) -> None:
        """End the run on `status` once what was produced before it is in.

        A re-bind or backfill under way finishes first; a status learnt from polling (its
        event went to a dropped connection, and maybe events before it too) backfills first.
        """
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                async with self._bind_lock:
                    if polled:
                        await self._backfill()
        except TimeoutError:
            log.warning("%s: re-bind/backfill still running after %gs; ending anyway", self.who, SETTLE_TIMEOUT)
        self.context.session.request_exit(0, f"capture session {status}")

    async def _on_connection(self, conn_id: str) -> None:
        """SessionLink listener: the source reconnected with a new connection id."""
        if self.session_id is not None and conn_id != self.record.get("ws_connection_id"):
            self._on_reconnect()

    def _on_reconnect(self) -> None:
        """Re-bind the session's AI pipelines, if it is still active, and backfill the gap (once VideoDB stopped
        it, only the backfill: before, transcripts and indexes were started on its stopped rtstreams)."""
        if self.lifecycle.done:
            return
        if self.pipelines is not None and self.pipelines.bound_to is not None:
            self._spawn_rebind(self.pipelines.streams, backfill_gap=True, hold=True)
        self._start_poll()

    async def _checkpoints(self, inlet: backfill.Inlet) -> None:
        """Save in capture_session.json where a restart's backfill starts: one period behind the source, and
        before the oldest event a sink holds only in memory.

        One period behind: events the source passed on just before a crash may still be in a
        sink's buffer (flushed every second by default), so a restart fetches them again rather
        than lose them (a few seconds of events may be written twice). A parquet sink holds rows
        until its file completes (`roll_interval`): the checkpoint stays before them until then.
        """
        taken = Checkpoints(margin=CHECKPOINT_EVERY / 2)
        held_since = self.context.session.held_since
        while not self.lifecycle.done:
            await asyncio.sleep(CHECKPOINT_EVERY)
            now = time.monotonic()
            taken.add(now, inlet.checkpoint())
            safe = taken.safe(now, held_since())
            if safe and safe != self.record.get("backfill_from"):
                self.record["backfill_from"] = safe
                self._save()

    def _start_poll(self, *, events_lost: bool = True) -> None:
        """Lifecycle events may still go to an old connection (`events_lost`), or an export is awaited:
        also poll the session status."""
        self._events_lost = self._events_lost or events_lost
        if self._poll is None and not self.lifecycle.done:
            self._poll = self._spawn(self._poll_status())

    async def _poll_status(self) -> None:
        missing = 0  # polls in a row VideoDB answered 404: twice, and the session is gone (it sends nothing more)
        while not self.lifecycle.done:
            await asyncio.sleep(self.options.status_poll_interval)
            missing = await self._ask_status(missing, wait_for_event=True)
            if missing < 0:
                return

    async def _check_silence(self) -> None:
        """Lifecycle events can be lost while the WebSocket stays up, and then nothing polls: a session
        that sent nothing for `silent_check_interval` is asked about (one call at a time, at most one
        per interval; not while the status poll runs, which asks already)."""
        interval = self.options.silent_check_interval
        missing = 0
        while not self.lifecycle.done:
            wait = self._heard + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._heard = time.monotonic()  # the next check comes one interval later at the earliest
            if self._poll is None or self._poll.done():
                missing = await self._ask_status(missing, wait_for_event=False)
                if missing < 0:
                    return

    async def _ask_status(self, missing: int, *, wait_for_event: bool) -> int:
        """One `get_capture_session`, applied; returns the 404s in a row so far, or -1 once this ended the run.

        `wait_for_event`: an end status is applied one call later unless its event may have been lost
        (the poll gives the WebSocket event one interval to arrive first)."""
        try:
            session = await self._sdk("get_capture_session", self._conn.get_capture_session,
                                      self.session_id, self.settings.collection_id)
        except VideoDBCallError as exc:
            missing = missing + 1 if exc.status == 404 else 0
            if missing >= 2:
                log.error("%s", exc)
                self.context.session.request_exit(
                    3, f"capture session {self.session_id} no longer exists at VideoDB ({exc})")
                return -1
            log.warning("%s", exc)
            return missing
        if self.lifecycle.done:
            return 0
        status = reported_status(session)
        if self.lifecycle.state == "stopped" and status == "stopped" \
                and getattr(session, "export_status", None) == "failed":
            self._export_failed("VideoDB could not export it (get_capture_session: export_status failed)")
            return -1
        if status is None or not self.lifecycle.behind(status):
            return 0
        if wait_for_event and status in ("stopped", "exported", "failed") and self._poll_seen != status \
                and (status == "failed" or self.context.session.inlet is None or not self._events_lost):
            self._poll_seen = status  # give the WebSocket event one interval to arrive first
            return 0  # (with backfill, ending on a polled status backfills first: no need to wait)
        if not wait_for_event:
            self._events_lost = True  # its event never came: later ones (`exported`) may not either
            log.info("%s: capture session %s sent nothing for %gs; VideoDB reports it %s",
                     self.who, self.session_id, self.options.silent_check_interval, visible(status[:40]))
        self._transition(status, session=session, error="reported by get_capture_session")
        return 0

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
        if self.manager is not None:
            await self.manager.close()
        await self._background.cancel_all()
        if self._locked:
            self._locked = False
            state.release(self.state_file.parent)


def _error_text(error: Any) -> str:
    """The error of a failed session, fit for the one-line exit reason: bounded, control characters visible."""
    if isinstance(error, dict):
        error = error.get("message") or error.get("error") or orjson.dumps(error).decode()
    return visible(str(error)[:MAX_ERROR]) if error else "no error given"

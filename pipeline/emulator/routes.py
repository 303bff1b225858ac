"""The VideoDB HTTP endpoints the SDK calls for capture sessions, as aiohttp handlers.

Paths and body fields come from the installed SDK (client.py, capture_session.py,
rtstream.py); handlers return the `data` of the `{"success": true, "data": ...}`
envelope, or raise ApiError for the `{"success": false, "message": ...}` one.

What a pipeline produced is readable afterwards, whether or not it went out live
(times in the WebSocket events' unit, epoch milliseconds; `text` as in the event):

- `GET rtstream/{id}/transcription?page&page_size&start&end&since` (the SDK's
  `RTStream.get_transcript`): `{"rtstream_id", "engine", "segments": [{"text",
  "start", "end", "is_final"}], "page", "page_size", "total", "next_page"}`. The
  SDK does not fix this shape; this is the emulator's choice.
- `GET rtstream/{id}/index/scene/{index_id}?page&page_size&start&end`
  (`RTStreamSceneIndex.get_scenes`, visual and audio indexes alike):
  `{"scene_index_records": [{"text", "start", "end"}], "next_page", "page",
  "page_size", "total"}`; the SDK reads `scene_index_records` and `next_page`.

Filters (all optional, inclusive): `start` keeps records with `start >= start`,
`end` those with `start <= end`, `since` those with `start > since`. Records are
in production order; `page` counts from 1, `page_size` is 1..1000.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from pipeline.emulator.hub import Hub
from pipeline.emulator.player import Player
from pipeline.emulator.scenario import Scenario, Stream
from pipeline.emulator.state import AUDIO, TRANSCRIPT, VISUAL, Alert, Pipeline, Registry, Session, new_id

Data = dict[str, Any]
Handler = Callable[[web.Request, Data], Awaitable[Data]]


class ApiError(Exception):
    """An API error: HTTP status plus the message the SDK puts in its exception."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Api:
    """Handlers over one registry; `routes()` lists (method, path, handler)."""

    def __init__(self, registry: Registry, hub: Hub, player: Player, scenario: Scenario,
                 export_outcome: str = "exported") -> None:
        self.reg = registry
        self.export_outcome = export_outcome  # of every new session (see Session.export_outcome)
        self.hub = hub
        self.player = player
        self.scenario = scenario
        self.client_tokens: dict[str, float] = {}  # client token -> when it expires (time.time())
        self.ws_url = ""  # set by the server once it knows its port

    def routes(self) -> list[tuple[str, str, Handler]]:
        c, s, r = "/collection/{cid}", "/collection/{cid}/capture/session", "/rtstream/{rid}"
        return [
            ("GET", c, self.get_collection),
            ("GET", f"{c}/websocket", self.websocket_url),
            ("POST", s, self.create_session),
            ("GET", s, self.list_sessions),
            ("GET", f"{s}/{{sid}}", self.get_session),
            ("POST", f"{s}/{{sid}}/export", self.export_session),
            ("POST", "/capture/session/token", self.client_token),
            ("POST", "/rtstream/event", self.create_event),
            ("GET", "/rtstream/event", self.list_events),
            ("GET", r, self.get_rtstream),
            ("PATCH", f"{r}/status", self.rtstream_status),
            ("POST", f"{r}/transcription", self.transcription),
            ("GET", f"{r}/transcription", self.get_transcript),
            ("POST", f"{r}/index/scene", self.create_index),
            ("GET", f"{r}/index/scene", self.list_indexes),
            ("GET", f"{r}/index/scene/{{iid}}", self.get_scenes),
            ("PATCH", f"{r}/index/scene/{{iid}}/status", self.index_status),
            ("GET", f"{r}/index/{{iid}}", self.get_index),
            ("POST", f"{r}/index/{{iid}}/alert", self.create_alert),
            ("GET", f"{r}/index/{{iid}}/alert", self.list_alerts),
            ("PATCH", f"{r}/index/{{iid}}/alert/{{aid}}/status", self.alert_status),
        ]

    # --- collection, websocket, token ------------------------------------------------------------
    async def get_collection(self, req: web.Request, body: Data) -> Data:
        cid = req.match_info["cid"]
        return {"id": cid, "name": cid, "description": "emulated collection", "is_public": False}

    async def websocket_url(self, req: web.Request, body: Data) -> Data:
        return {"websocket_url": f"{self.ws_url}?collection_id={req.match_info['cid']}"}

    async def client_token(self, req: web.Request, body: Data) -> Data:
        expires_in = body.get("expires_in", 86400)
        if not isinstance(expires_in, int) or expires_in <= 0:
            raise ApiError(400, "expires_in must be a positive integer")
        token = "ct-" + secrets.token_urlsafe(24)
        expires_at = time.time() + expires_in
        self.client_tokens[token] = expires_at
        return {"token": token, "expires_in": expires_in, "expires_at": int(expires_at)}

    def token_problem(self, token: str) -> str | None:
        """Why a client token is refused (unknown, expired), or None when it is valid now."""
        expires = self.client_tokens.get(token)
        if expires is None:
            return "unknown client token"
        return "client token expired" if time.time() >= expires else None

    # --- capture sessions ------------------------------------------------------------------------
    async def create_session(self, req: web.Request, body: Data) -> Data:
        end_user = body.get("end_user_id")
        if not isinstance(end_user, str) or not end_user:
            raise ApiError(400, "end_user_id is required")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ApiError(400, "metadata must be an object")
        s = Session(id=new_id("cap"), collection_id=req.match_info["cid"], end_user_id=end_user,
                    conn=body.get("ws_connection_id") or None, scenario=self.scenario,
                    streams=self.reg.stream_ids(self.scenario), metadata=metadata,
                    callback_url=body.get("callback_url"), export_outcome=self.export_outcome)
        self.reg.add_session(s)
        self.player.created(s)
        return s.shape()

    async def list_sessions(self, req: web.Request, body: Data) -> Data:
        status = req.query.get("status")
        return {"sessions": [s.shape() for s in self.reg.sessions.values()
                             if s.collection_id == req.match_info["cid"] and status in (None, s.status)]}

    async def get_session(self, req: web.Request, body: Data) -> Data:
        return self.session(req.match_info["sid"], req.match_info["cid"]).shape()

    async def export_session(self, req: web.Request, body: Data) -> Data:
        s = self.session(req.match_info["sid"], req.match_info["cid"])
        if s.status not in ("stopped", "exported"):
            raise ApiError(400, f"capture session {s.id} is {s.status}; export needs it stopped")
        if not s.stored:
            raise ApiError(400, f"capture session {s.id} has no stored channel to export")
        out: Data = {"session_id": s.id, "video_channel_id": body.get("video_channel_id"),
                     "export_status": "exporting"}
        if s.export_failed:
            out["export_status"] = "failed"
        elif s.export is not None:
            e = s.export
            out.update(export_status="exported", video_id=e["exported_video_id"],
                       stream_url=e["stream_url"], player_url=e["player_url"])
        return out

    def session(self, sid: str, collection_id: str) -> Session:
        s = self.reg.sessions.get(sid)
        if s is None or s.collection_id != collection_id:  # a session lives in one collection
            raise ApiError(404, f"capture session {sid} not found")
        return s

    # --- events (alert definitions) --------------------------------------------------------------
    async def create_event(self, req: web.Request, body: Data) -> Data:
        label, prompt = body.get("label"), body.get("event_prompt")
        if not isinstance(label, str) or not label or not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "event_prompt and label are required")
        for ev in self.reg.events.values():  # same label again (a re-bind): same event
            if ev["label"] == label:
                ev["event_prompt"] = prompt
                return {"event_id": ev["event_id"]}
        eid = new_id("evt")
        self.reg.events[eid] = {"event_id": eid, "event_prompt": prompt, "label": label}
        return {"event_id": eid}

    async def list_events(self, req: web.Request, body: Data) -> Data:
        return {"events": list(self.reg.events.values())}

    # --- rtstreams and their pipelines -----------------------------------------------------------
    def stream(self, req: web.Request) -> tuple[Session, Stream]:
        rid = req.match_info["rid"]
        s = self.reg.by_stream.get(rid)
        if s is None:
            raise ApiError(404, f"rtstream {rid} not found")
        return s, s.streams[rid]

    async def get_rtstream(self, req: web.Request, body: Data) -> Data:
        s, st = self.stream(req)
        return s.rtstream_shape(st)

    async def rtstream_status(self, req: web.Request, body: Data) -> Data:
        s, st = self.stream(req)
        if body.get("action") == "stop":
            self._stream_stopped(s, st)
        return {"rtstream_id": st.rtstream_id, "status": "connected" if body.get("action") == "start" else "stopped"}

    def _stream_stopped(self, s: Session, st: Stream) -> None:
        """A backend stopped an rtstream; once all of a session's are stopped, the session stops."""
        s.stopped_streams.add(st.rtstream_id)
        if s.stopped_streams >= set(s.streams) and s.status not in ("stopping", "stopped", "exported", "failed"):
            s.stop_requested = True
            s.wake.set()

    async def transcription(self, req: web.Request, body: Data) -> Data:
        s, st = self.stream(req)
        action = body.get("action")
        if action == "stop":
            p = self.reg.transcripts.get(st.rtstream_id)
            if p is not None:
                p.running = False
            return {"rtstream_id": st.rtstream_id, "status": "stopped", "end_time": int(time.time())}
        if action != "start":
            raise ApiError(400, "action must be start or stop")
        if "audio" not in st.media_types:
            raise ApiError(400, f"rtstream {st.name} has no audio to transcribe")
        conn = body.get("ws_connection_id") or None
        p = self.reg.transcripts.get(st.rtstream_id)
        if p is None:
            self.reg.transcripts[st.rtstream_id] = Pipeline(TRANSCRIPT, st.rtstream_id, new_id("tr"), conn,
                                                            body=body)
        else:  # a re-start re-binds the running transcript
            self._rebind(p.conn, conn)
            p.conn, p.running, p.body = conn, True, body
        self._setup(s)
        return {"rtstream_id": st.rtstream_id, "status": "started", "start_time": int(time.time()),
                "engine": body.get("engine") or "assemblyai"}

    async def create_index(self, req: web.Request, body: Data) -> Data:
        s, st = self.stream(req)
        kind = VISUAL if body.get("extraction_type") in ("time", "shot") else AUDIO
        if kind == VISUAL and "video" not in st.media_types:
            raise ApiError(400, f"rtstream {st.name} has no video to index visually")
        if kind == AUDIO and "audio" not in st.media_types:
            raise ApiError(400, f"rtstream {st.name} has no audio to index")
        conn = body.get("ws_connection_id") or None
        for old in self.reg.indexes_for(st.rtstream_id, kind):  # a new index for a new connection
            self._rebind(old.conn, conn)
        p = Pipeline(kind, st.rtstream_id, new_id("idx"), conn, body=body)
        self.reg.indexes[p.index_id] = p
        self._setup(s)
        return p.index_shape()

    def _rebind(self, old: str | None, new: str | None) -> None:
        if old and new:
            self.hub.rebind(old, new)

    def _setup(self, s: Session) -> None:
        s.setup_calls += 1
        s.last_setup = asyncio.get_running_loop().time()
        s.wake.set()  # a session waiting for its pipelines recomputes when to start playing

    def index(self, req: web.Request) -> Pipeline:
        self.stream(req)
        p = self.reg.indexes.get(req.match_info["iid"])
        if p is None or p.rtstream_id != req.match_info["rid"]:
            raise ApiError(404, f"scene index {req.match_info['iid']} not found")
        return p

    async def list_indexes(self, req: web.Request, body: Data) -> Data:
        _s, st = self.stream(req)
        return {"scene_indexes": [p.index_shape() for p in self.reg.indexes.values()
                                  if p.rtstream_id == st.rtstream_id]}

    async def get_index(self, req: web.Request, body: Data) -> Data:
        return self.index(req).index_shape()

    async def get_scenes(self, req: web.Request, body: Data) -> Data:
        page = _page(req, self.index(req).records)
        return {"scene_index_records": page.pop("records"), **page}

    async def get_transcript(self, req: web.Request, body: Data) -> Data:
        _s, st = self.stream(req)
        p = self.reg.transcripts.get(st.rtstream_id)
        page = _page(req, p.records if p is not None else [])
        return {"rtstream_id": st.rtstream_id, "engine": req.query.get("engine") or "assemblyai",
                "segments": page.pop("records"), **page}

    async def index_status(self, req: web.Request, body: Data) -> Data:
        p = self.index(req)
        if body.get("action") not in ("start", "stop"):
            raise ApiError(400, "action must be start or stop")
        p.running = body["action"] == "start"
        return p.index_shape()

    # --- alerts ----------------------------------------------------------------------------------
    async def create_alert(self, req: web.Request, body: Data) -> Data:
        p = self.index(req)
        event = self.reg.events.get(str(body.get("event_id")))
        if event is None:
            raise ApiError(400, f"event {body.get('event_id')} not found (create it with create_event)")
        conn = body.get("ws_connection_id") or None
        for a in self.reg.alerts.values():  # one alert per index and label: a second call re-binds
            if a.index_id == p.index_id and a.label == event["label"]:
                self._rebind(a.conn, conn)
                a.conn, a.event_id, a.callback_url, a.enabled = conn, event["event_id"], body.get(
                    "callback_url"), True
                break
        else:
            for other in self.reg.alerts.values():
                if other.label == event["label"]:
                    self._rebind(other.conn, conn)
            a = Alert(new_id("alt"), p.index_id, event["event_id"], event["label"], conn,
                      body.get("callback_url"))
            self.reg.alerts[a.alert_id] = a
        self._setup(self.reg.by_stream[p.rtstream_id])
        return {"alert_id": a.alert_id}

    async def list_alerts(self, req: web.Request, body: Data) -> Data:
        p = self.index(req)
        return {"alerts": [a.shape() for a in self.reg.alerts.values() if a.index_id == p.index_id]}

    async def alert_status(self, req: web.Request, body: Data) -> Data:
        p = self.index(req)
        a = self.reg.alerts.get(req.match_info["aid"])
        if a is None or a.index_id != p.index_id:
            raise ApiError(404, f"alert {req.match_info['aid']} not found")
        if body.get("action") not in ("enable", "disable"):
            raise ApiError(400, "action must be enable or disable")
        a.enabled = body["action"] == "enable"
        return a.shape()


def _number(req: web.Request, name: str) -> float | None:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {raw!r}") from None


def _page(req: web.Request, records: Iterable[Data]) -> Data:
    """Filter `records` by the query's start/end/since and cut out the requested page."""
    page, size = _number(req, "page"), _number(req, "page_size")
    page_i, size_i = int(page or 1), int(size or 100)
    if page_i < 1 or not 1 <= size_i <= 1000:
        raise ApiError(400, "page must be >= 1 and page_size 1..1000")
    lo, hi, since = _number(req, "start"), _number(req, "end"), _number(req, "since")
    kept = [r for r in records
            if (lo is None or r["start"] >= lo) and (hi is None or r["start"] <= hi)
            and (since is None or r["start"] > since)]
    first = (page_i - 1) * size_i
    return {"records": [dict(r) for r in kept[first:first + size_i]], "page": page_i, "page_size": size_i,
            "total": len(kept), "next_page": first + size_i < len(kept)}

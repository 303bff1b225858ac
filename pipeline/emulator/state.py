"""What the emulated VideoDB knows: sessions, their rtstreams, pipelines, events and alerts.

Plain records plus one registry, so HTTP handlers and the player share a
single truth about which connection id receives which events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.emulator.scenario import Scenario, Stream

#: Pipeline kinds, named after the WebSocket channel they feed.
TRANSCRIPT: Final = "transcript"
VISUAL: Final = "visual_index"
AUDIO: Final = "audio_index"
#: Session statuses after which nothing more happens.
FINISHED: Final = frozenset({"exported", "failed"})
#: How a stored session's export ends: made (`exported`), failed (VideoDB's `export_status: failed`; the
#: session stays `stopped` and no lifecycle event follows) or never (`export_status` stays `exporting`).
EXPORT_OUTCOMES: Final = ("exported", "failed", "never")
#: Records a transcript or index keeps for its REST listing (backfill reads them): the newest ones. VideoDB
#: keeps them all; the emulator bounds them (about 3 hours at one record a second).
RECORDS_KEPT = 10_000


class Wakeup:
    """A session's wake-up signal for its one playback task: like `asyncio.Event`, but a timed wait costs
    one future and one timer (`asyncio.wait_for` adds a task and its cancellation, the emulator's largest
    cost with thousands of sessions)."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None:
            _expire(self._waiter)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float | None = None) -> bool:
        """Until set() or `timeout` seconds (None: no limit); True if set. One waiter at a time."""
        if self._set:
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiter = fut
        timer = None if timeout is None else fut.get_loop().call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self._set


def _expire(fut: asyncio.Future[None]) -> None:
    """End a wait (the timer's, or set()'s): whichever comes second finds it done."""
    if not fut.done():
        fut.set_result(None)


def new_id(prefix: str) -> str:
    """A fresh opaque id such as `cap-3f9a0c1d2e4b`."""
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass
class Pipeline:
    """A started transcript or scene index on one rtstream, bound to a connection id."""

    kind: str
    rtstream_id: str
    index_id: str
    conn: str | None
    running: bool = True
    body: dict[str, Any] = field(default_factory=dict)
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECORDS_KEPT))  # REST listing

    def index_shape(self) -> dict[str, Any]:
        """The scene index as the SDK's RTStreamSceneIndex reads it."""
        b = self.body
        return {"rtstream_index_id": self.index_id, "rtstream_id": self.rtstream_id,
                "extraction_type": b.get("extraction_type"), "extraction_config": b.get("extraction_config"),
                "prompt": b.get("prompt"), "name": b.get("name") or f"{self.kind}-{self.index_id}",
                "status": "connected" if self.running else "stopped", "sandbox_id": b.get("sandbox_id")}


@dataclass
class Alert:
    """An alert on a scene index: fires on scenario alerts whose label matches its event."""

    alert_id: str
    index_id: str
    event_id: str
    label: str
    conn: str | None
    callback_url: str | None
    enabled: bool = True

    def shape(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "event_id": self.event_id, "label": self.label,
                "callback_url": self.callback_url, "ws_connection_id": self.conn,
                "status": "enabled" if self.enabled else "disabled"}


@dataclass
class Session:
    """One capture session and the streams it owns."""

    id: str
    collection_id: str
    end_user_id: str
    conn: str | None
    scenario: Scenario
    streams: dict[str, Stream]  # rtstream_id -> stream (ids unique per session)
    metadata: dict[str, Any] = field(default_factory=dict)
    callback_url: str | None = None
    status: str = "created"
    export: dict[str, Any] | None = None
    export_outcome: str = "exported"  # one of EXPORT_OUTCOMES
    export_failed: bool = False  # the export ended in `export_status: failed`
    created_at: float = field(default_factory=time.time)
    setup_calls: int = 0  # pipelines/alerts set up on this session's streams
    last_setup: float = 0.0  # loop time of the latest such call
    wake: Wakeup = field(default_factory=Wakeup)  # start/stop requested by hand, or a setup call
    start_requested: bool = False
    stop_requested: bool = False
    lifecycle_lost: bool = False  # its lifecycle events are no longer delivered (lost on VideoDB's side)
    stopped_streams: set[str] = field(default_factory=set)  # rtstreams stopped through the API
    task: asyncio.Task[None] | None = None

    @property
    def stored(self) -> bool:
        """A channel is stored: the session is exported after it stops (else `stopped` is its last status)."""
        return any(s.store for s in self.streams.values())

    @property
    def finished(self) -> bool:
        return self.status in FINISHED or (self.status == "stopped" and (not self.stored or self.export_failed))

    def stream_by_name(self, name: str) -> Stream:
        for s in self.streams.values():
            if s.name == name:
                return s
        raise KeyError(name)

    def rtstreams_seed(self) -> list[dict[str, Any]]:
        """`data.rtstreams` of `capture_session.active`."""
        return [s.seed_shape() for s in self.streams.values()]

    def rtstream_shape(self, s: Stream) -> dict[str, Any]:
        """An rtstream as the API returns it (the SDK's RTStream kwargs; `channel_id` = type)."""
        return {"id": s.rtstream_id, "rtstream_id": s.rtstream_id, "name": s.name, "collection_id": self.collection_id,
                "channel_id": s.type, "media_types": list(s.media_types), "status": "connected",
                "sample_rate": 30 if "video" in s.media_types else 16000,
                "created_at": _iso(self.created_at)}

    def shape(self) -> dict[str, Any]:
        """The session as `get_capture_session` returns it."""
        live = self.status not in ("created", "starting")
        data: dict[str, Any] = {
            "session_id": self.id, "collection_id": self.collection_id, "end_user_id": self.end_user_id,
            "client_id": None, "status": self.status, "callback_url": self.callback_url,
            "ws_connection_id": self.conn, "metadata": self.metadata,
            "channels": [{"channel_id": s.name, "name": s.name,
                          "type": "video" if "video" in s.media_types else "audio",
                          "store": s.store, "is_primary": s.type == "screen"} for s in self.streams.values()],
            "primary_video_channel_id": next((s.name for s in self.streams.values() if s.type == "screen"),
                                             None),
            "export_status": None, "exported_video_id": None,
            "rtstreams": [self.rtstream_shape(s) for s in self.streams.values()] if live else [],
            "created_at": _iso(self.created_at),
        }
        if self.status == "stopped" and self.stored:
            data["export_status"] = "failed" if self.export_failed else "exporting"
        if self.export is not None:
            data["export_status"] = "exported"
            data["exported_video_id"] = self.export["exported_video_id"]
        return data


class _Indexes(dict[str, Pipeline]):
    """index_id -> scene index, also listed per rtstream: the player looks them up for every event."""

    def __init__(self) -> None:
        super().__init__()
        self.by_stream: dict[str, list[Pipeline]] = {}

    def __setitem__(self, index_id: str, p: Pipeline) -> None:
        if index_id not in self:
            self.by_stream.setdefault(p.rtstream_id, []).append(p)
        super().__setitem__(index_id, p)


class Registry:
    """All sessions, pipelines, events and alerts of one emulator."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.by_stream: dict[str, Session] = {}  # rtstream_id -> owning session
        self.transcripts: dict[str, Pipeline] = {}  # rtstream_id -> its transcript (one per stream)
        self.indexes = _Indexes()  # index_id -> scene index, in creation order
        self.events: dict[str, dict[str, str]] = {}  # event_id -> {event_id, event_prompt, label}
        self.alerts: dict[str, Alert] = {}
        self.finished = asyncio.Event()

    def add_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        for rid in session.streams:
            self.by_stream[rid] = session
        self.finished.clear()

    def stream_ids(self, scn: Scenario) -> dict[str, Stream]:
        """Rtstream ids for a new session: the scenario's own for the first, suffixed after."""
        n = len(self.sessions)
        out: dict[str, Stream] = {}
        for s in scn.streams:
            rid = s.rtstream_id if n == 0 else f"{s.rtstream_id}-s{n + 1}"
            out[rid] = Stream(rid, s.name, s.media_types, s.type, s.store)
        return out

    def indexes_for(self, rtstream_id: str, kind: str) -> list[Pipeline]:
        """Running scene indexes of one kind on a stream, newest first."""
        return [p for p in reversed(self.indexes.by_stream.get(rtstream_id, ())) if p.running and p.kind == kind]

    def alerts_for(self, rtstream_id: str, label: str) -> list[Alert]:
        """Enabled alerts on a running index of `rtstream_id` whose event has `label`, newest first."""
        out = []
        for a in reversed(self.alerts.values()):
            p = self.indexes.get(a.index_id)
            if a.enabled and a.label == label and p is not None and p.running and p.rtstream_id == rtstream_id:
                out.append(a)
        return out

    def all_finished(self) -> bool:
        return bool(self.sessions) and all(s.finished for s in self.sessions.values())


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

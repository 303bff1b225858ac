"""One API-managed capture session: its record, lifecycle, AI pipelines and event counters.

The `SessionManager` (session_manager.py) holds many of these; each follows its
own lifecycle (created -> ... -> exported, or failed) and none of them ends the
pipeline. The record is what `<state_dir>/sessions/<id>.json` holds and what
the session API shows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import orjson

from pipeline.events import iso_ts
from pipeline.termsafe import visible
from stages.controller.ai_pipelines import AIPipelines, OnActive
from stages.controller.lifecycle import Lifecycle

#: Record keys the API shows (the client token only in the answers that create it).
PUBLIC: Final[tuple[str, ...]] = ("session_id", "end_user_id", "status", "metadata", "created_at", "expires_at",
                 "ws_connection_id", "stop_requested", "stored", "error", "exported_video_id", "stream_url",
                 "player_url")
_EXPORT_KEYS: Final = ("exported_video_id", "stream_url", "player_url")


class ManagedSession:
    """A capture session created through the API (or re-attached from its saved record)."""

    __slots__ = ("checked", "counts", "heard", "last_event", "lifecycle", "lock", "on_active", "pipelines",
                 "rebind_waiting", "record", "seq", "streams_known")

    def __init__(self, record: dict[str, Any], on_active: OnActive) -> None:
        metadata = record.get("metadata")
        if isinstance(metadata, dict):  # held as its JSON text: written, shown and listed as it is, never read
            # (as objects, 60 KB of `[[], [], ...]` were 20,000 lists: 1.5 MB per session, walked by every full
            # garbage collection)
            record["metadata"] = orjson.Fragment(orjson.dumps(metadata))
        self.record = record
        self.on_active = on_active
        self.lifecycle = Lifecycle(record["session_id"])
        self.pipelines: AIPipelines | None = None
        self.counts: dict[str, int] = {}
        self.last_event: float | None = None  # receipt time (unix_ts) of its latest event
        self.heard = time.monotonic()  # when it was added or its latest event (lifecycle ones too) came
        self.checked = 0.0  # when the silent check last asked VideoDB about it (time.monotonic())
        self.lock = asyncio.Lock()  # one bind/stop at a time per session
        self.streams_known = False  # rtstreams learnt (from `active` or get_capture_session)
        self.rebind_waiting = False  # a re-bind after a reconnect is queued, not begun: another adds nothing
        self.seq = 0  # its place in the registry's order (set when added; listings page by it)

    @property
    def id(self) -> str:
        return str(self.record["session_id"])

    @property
    def live(self) -> bool:
        """Still producing events we want: not finished and not stopped through the API."""
        return not self.lifecycle.done and not self.record.get("stop_requested")

    def apply_status(self, status: str, data: dict[str, Any] | None, error: Any = None) -> None:
        """Record what a lifecycle step tells about the session (the lifecycle itself already moved)."""
        self.record["status"] = status
        data = data or {}
        if status == "exported":
            self.record.update({k: data[k] for k in _EXPORT_KEYS if data.get(k)})
        elif status == "failed":
            self.record["error"] = _error_text(error if error is not None else data.get("error"))

    def remember_streams(self, rtstreams: list[dict[str, Any]]) -> None:
        self.record["rtstreams"] = rtstreams
        self.streams_known = True

    def view(self, *, with_token: bool = False) -> dict[str, Any]:
        """The session as the API shows it."""
        r = self.record
        out: dict[str, Any] = {k: r.get(k) for k in PUBLIC if k in r}
        out["status"] = self.lifecycle.state or r.get("status")
        out["rtstreams"] = r.get("rtstreams") or []
        out["events"] = dict(self.counts)
        out["events_total"] = sum(self.counts.values())
        out["last_event_at"] = iso_ts(self.last_event) if self.last_event is not None else None
        if with_token:
            out["client_token"] = r.get("client_token")
        return out


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("error") or str(error)
    return visible(str(error)[:1000]) if error else "no error given"

"""Processor `enrich`: add what the stream itself tells us about the session.

`capture_session.active` lists the session's rtstreams; from then on every
event of those rtstreams gets `capture_session_id`, `rtstream_name` and
`media_types`. Index texts that are JSON objects are parsed into `data.json`
(unless nested so deep that the event would pass the sources' depth limit).

The rtstream map lives in `context.state` (saved in `state_dir`, so a restart
keeps the names) and is evicted by event time: an rtstream not seen for
`rtstream_ttl`, or whose session was exported or failed `ended_ttl` ago, is
forgotten, and at most `max_rtstreams` are kept.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import Field

from pipeline.api import Batch, Context, Event, Options, Processor
from pipeline.events import MAX_DEPTH, canonical, deeper_than, event_time_ms, lifecycle_status
from pipeline.types import Duration
from stages.processors.eviction import Eviction
from stages.processors.native import plain_reads

try:  # the plain case's loop in C (built with the package); without it _enrich() runs per event
    from stages.processors import _fastloops
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastloops = None  # type: ignore[assignment]

_JSON_CHANNELS = frozenset({"visual_index", "scene_index", "audio_index"})


class EnrichOptions(Options):
    capture_session: bool = Field(default=True, description="add capture_session_id once the session is known")
    rtstreams: bool = Field(default=True, description="add rtstream_name and media_types from the active event")
    parse_json: bool = Field(default=True, description="parse JSON-object index texts into data.json")
    fields: dict[str, Any] = Field(default_factory=dict, description="static fields added when absent")
    rtstream_ttl: Duration = Field(default=6 * 3600.0, description="forget an rtstream not seen this long "
                                                                  "(event time)")
    ended_ttl: Duration = Field(default=600.0, description="forget a session's rtstreams this long after it was "
                                                          "exported or failed")
    max_rtstreams: int = Field(default=100_000, ge=100, description="at most this many rtstreams remembered; "
                                                                    "the least recently seen go first")


#: How stale (event time) an rtstream's "last seen" may get before it is written again.
_SEEN_REFRESH_MS = 600_000


class Enrich(Processor):
    """Adds session id, rtstream name/media types, static fields and parsed JSON text."""

    name = "enrich"
    Options = EnrichOptions

    def __init__(self, options: EnrichOptions, context: Context) -> None:
        super().__init__(options, context)
        # rtstream_id -> [capture_session_id, name, media_types, last seen ms]; survives restarts
        self._streams = context.state.get("enrich.rtstreams")
        for rid, info in list(self._streams.items()):  # saved by an older or foreign version: drop
            if not (isinstance(info, list) and len(info) == 4 and type(info[3]) is int):
                del self._streams[rid]
        self._evict = Eviction(int(options.rtstream_ttl * 1000), options.max_rtstreams)
        self._ended_ms = int(options.ended_ttl * 1000)

    def _learn(self, event: dict[str, Any], now: int) -> None:
        session_id = event.get("capture_session_id")
        if not isinstance(session_id, str):
            return
        status = lifecycle_status(event)
        if status in ("exported", "failed"):  # its rtstreams expire ended_ttl from now
            seen = now - self._evict.horizon_ms + self._ended_ms
            for rid, info in list(self._streams.items()):
                if info[0] == session_id and info[3] > seen:
                    self._streams[rid] = [*info[:3], seen]
            return
        data = event.get("data")
        streams = data.get("rtstreams") if isinstance(data, dict) else None
        if isinstance(streams, list):
            for s in streams:
                if isinstance(s, dict) and isinstance(s.get("rtstream_id"), str):
                    self._streams[s["rtstream_id"]] = [session_id, s.get("name"), s.get("media_types"), now]

    #: Use the C loop when the options and state allow it (tests switch it off to compare both paths).
    native = True

    def process(self, batch: Batch) -> Batch:
        o = self.options
        streams = self._streams
        now = event_time_ms(batch[-1]) if batch else 0
        self._evict.seen(now)
        stale = now - _SEEN_REFRESH_MS
        if _fastloops is not None and self.native and plain_reads(streams) and not o.fields:
            _fastloops.enrich(batch, streams, now, stale, o.capture_session, o.rtstreams, o.parse_json,
                              lambda event: self._enrich(event, now, stale), self._parse_json)
        else:
            for event in batch:
                self._enrich(event, now, stale)
        if self._evict.due(streams):
            self._evict.sweep(streams, _seen)
        return batch

    def _enrich(self, event: Event, now: int, stale: int) -> None:
        """Everything enrich does to one event (the reference the C loop is held to)."""
        o = self.options
        if "event" in event:
            self._learn(event, now)
            for k, v in o.fields.items():
                event.setdefault(k, v)
            return
        streams = self._streams
        rts = event.get("rtstream_id")
        info = streams.get(rts) if isinstance(rts, str) else None
        if info and info[3] < stale:  # still in use: refresh "last seen" (a state write, so rarely)
            info = streams[str(rts)] = [*info[:3], now]
        if o.capture_session and info and "capture_session_id" not in event:
            event["capture_session_id"] = info[0]
        if o.rtstreams and info:
            if info[1] is not None and "rtstream_name" not in event:
                event["rtstream_name"] = info[1]
            if info[2] is not None and "media_types" not in event:
                event["media_types"] = info[2]
        for k, v in o.fields.items():
            event.setdefault(k, v)
        if o.parse_json:
            self._parse_json(event)

    @staticmethod
    def _parse_json(event: Event) -> None:
        """An index text that is a JSON object becomes data.json (unless nested past the depth limit)."""
        data = event.get("data")
        if isinstance(data, dict):
            text = data.get("text")
            if isinstance(text, str) and text[:1] == "{" and canonical(str(event.get("channel"))) in _JSON_CHANNELS:
                try:
                    parsed = orjson.loads(text)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and not deeper_than(text, parsed, MAX_DEPTH - 2):
                    data["json"] = parsed  # (2 levels below the event: the edge's depth limit holds)


def _seen(info: Any) -> int:
    return info[3] if isinstance(info, list) and len(info) == 4 and type(info[3]) is int else 0

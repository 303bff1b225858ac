"""Processor `enrich`: add what the stream itself tells us about the session.

`capture_session.active` lists the session's rtstreams; from then on every
event of those rtstreams gets `capture_session_id`, `rtstream_name` and
`media_types`. Index texts that are JSON objects are parsed into `data.json`
(unless nested so deep that the event would pass the sources' depth limit).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import Field

from pipeline.api import Batch, Context, Options, Processor
from pipeline.events import MAX_DEPTH, canonical, deeper_than

_JSON_CHANNELS = frozenset({"visual_index", "scene_index", "audio_index"})


class EnrichOptions(Options):
    capture_session: bool = Field(default=True, description="add capture_session_id once the session is known")
    rtstreams: bool = Field(default=True, description="add rtstream_name and media_types from the active event")
    parse_json: bool = Field(default=True, description="parse JSON-object index texts into data.json")
    fields: dict[str, Any] = Field(default_factory=dict, description="static fields added when absent")


class Enrich(Processor):
    """Adds session id, rtstream name/media types, static fields and parsed JSON text."""

    name = "enrich"
    Options = EnrichOptions

    def __init__(self, options: EnrichOptions, context: Context) -> None:
        super().__init__(options, context)
        # rtstream_id -> [capture_session_id, name, media_types]; a state mapping so it survives restarts
        self._streams = context.state.get("enrich.rtstreams")

    def _learn(self, event: dict[str, Any]) -> None:
        session_id = event.get("capture_session_id")
        if not isinstance(session_id, str):
            return
        data = event.get("data")
        streams = data.get("rtstreams") if isinstance(data, dict) else None
        if isinstance(streams, list):
            for s in streams:
                if isinstance(s, dict) and isinstance(s.get("rtstream_id"), str):
                    self._streams[s["rtstream_id"]] = [session_id, s.get("name"), s.get("media_types")]

    def process(self, batch: Batch) -> Batch:
        o = self.options
        streams = self._streams
        add_session, add_streams, parse_json = o.capture_session, o.rtstreams, o.parse_json
        fields = list(o.fields.items())
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        for event in batch:
            if "event" in event:
                self._learn(event)
                for k, v in fields:
                    event.setdefault(k, v)
                continue
            rts = event.get("rtstream_id")
            info = streams.get(rts) if isinstance(rts, str) else None
            if add_session and info and "capture_session_id" not in event:
                event["capture_session_id"] = info[0]
            if add_streams and info:
                if info[1] is not None and "rtstream_name" not in event:
                    event["rtstream_name"] = info[1]
                if info[2] is not None and "media_types" not in event:
                    event["media_types"] = info[2]
            for k, v in fields:
                event.setdefault(k, v)
            if parse_json:
                data = event.get("data")
                if isinstance(data, dict):
                    text = data.get("text")
                    if (isinstance(text, str) and text[:1] == "{"
                            and canonical(str(event.get("channel"))) in _JSON_CHANNELS):
                        try:
                            parsed = loads(text)
                        except decode_error:
                            parsed = None
                        if isinstance(parsed, dict) and not deeper_than(text, parsed, MAX_DEPTH - 2):
                            data["json"] = parsed  # (2 levels below the event: the edge's depth limit holds)
        return batch

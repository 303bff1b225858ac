"""Scenario files (YAML or JSONL) the emulator plays, and the events they become.

One loader and one event builder, shared by the emulator and the sample
generator, so the shipped sample and a live emulated session never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.errors import StageError

#: The shipped scenario: the single source of truth for emulator and sample.
DEFAULT_SCENARIO: Final = Path(__file__).resolve().parents[2] / "config" / "scenarios" / "meeting.yaml"

CHANNELS: Final = ("transcript", "visual_index", "audio_index", "alert")
FAILED: Final = "capture_session.failed"
#: Seconds of media an event covers when the scenario does not say (`span`).
DEFAULT_SPAN: Final = {"transcript": 2.0, "visual_index": 4.0, "audio_index": 8.0, "alert": 0.0}
#: `session.get_rtstream(type)` values and the stream names they select.
STREAM_TYPES: Final = ("mic", "system_audio", "screen")
DEFAULT_RTSTREAMS: Final = (
    {"rtstream_id": "rts-mic-01", "name": "mic:default", "media_types": ["audio"], "type": "mic"},
    {"rtstream_id": "rts-sys-02", "name": "system_audio:default", "media_types": ["audio"],
     "type": "system_audio"},
    {"rtstream_id": "rts-dsp-03", "name": "display:1", "media_types": ["video"], "type": "screen"},
)


@dataclass(frozen=True, slots=True)
class Stream:
    """One rtstream of the emulated session."""

    rtstream_id: str
    name: str
    media_types: tuple[str, ...]
    type: str
    store: bool = True  # the desktop client's `channel.store`: only a session with a stored channel is exported

    def seed_shape(self) -> dict[str, Any]:
        """As listed in `capture_session.active` `data.rtstreams`."""
        return {"rtstream_id": self.rtstream_id, "name": self.name, "media_types": list(self.media_types)}


@dataclass(frozen=True, slots=True)
class Cue:
    """One scripted event: what to send on which stream, `at` seconds after active."""

    at: float
    channel: str  # transcript | visual_index | audio_index | alert | capture_session.failed
    stream: str  # rtstream name ("" for a failure)
    text: str
    is_final: bool = True
    span: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario: streams, cues sorted by time, and when stopping begins."""

    name: str
    streams: tuple[Stream, ...]
    cues: tuple[Cue, ...]
    end: float
    source: str = field(default="")

    def stream(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """Cues per channel (for reports and tests)."""
        out: dict[str, int] = {}
        for c in self.cues:
            out[c.channel] = out.get(c.channel, 0) + 1
        return out


def load(path: str | Path | None = None) -> Scenario:
    """Load a YAML (`.yaml`/`.yml`) or JSONL scenario; StageError names the file and entry."""
    p = Path(path) if path is not None else DEFAULT_SCENARIO
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise StageError(f"scenario {p}: cannot read: {exc.strerror or exc}") from None
    if p.suffix in (".jsonl", ".ndjson"):
        doc = _jsonl_doc(p, raw)
    else:
        import yaml

        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise StageError(f"scenario {p}: invalid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise StageError(f"scenario {p}: expected a mapping with an `events` list")
    return _build(p, doc)


def _jsonl_doc(p: Path, raw: str) -> dict[str, Any]:
    """JSONL: one event entry per line; a line with `rtstreams` (and no `at`) sets the streams."""
    doc: dict[str, Any] = {"events": []}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(f"scenario {p}:{n}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise StageError(f"scenario {p}:{n}: expected a JSON object")
        if "at" not in obj and ("rtstreams" in obj or "end" in obj or "name" in obj):
            doc.update(obj)
        else:
            obj.setdefault("_line", n)
            doc["events"].append(obj)
    return doc


def _build(p: Path, doc: dict[str, Any]) -> Scenario:
    streams = tuple(_stream(p, i, s) for i, s in enumerate(doc.get("rtstreams") or DEFAULT_RTSTREAMS))
    names = {s.name for s in streams}
    cues = sorted((_cue(p, i, e, names) for i, e in enumerate(doc["events"])), key=lambda c: c.at)
    last = cues[-1].at if cues else 0.0
    end = doc.get("end", last + 2.0)
    if not isinstance(end, int | float) or end < last:
        raise StageError(f"scenario {p}: `end` must be a number >= the last event's `at` ({last})")
    return Scenario(str(doc.get("name") or p.stem), streams, tuple(cues), float(end), str(p))


def _stream(p: Path, i: int, s: Any) -> Stream:
    if not isinstance(s, dict) or not s.get("rtstream_id") or not s.get("name"):
        raise StageError(f"scenario {p}: rtstreams[{i}] needs `rtstream_id` and `name`")
    media = s.get("media_types") or ["audio"]
    kind = s.get("type") or _guess_type(str(s["name"]))
    if kind not in STREAM_TYPES:
        raise StageError(f"scenario {p}: rtstreams[{i}].type must be one of {', '.join(STREAM_TYPES)}")
    store = s.get("store", True)
    if not isinstance(store, bool):
        raise StageError(f"scenario {p}: rtstreams[{i}].store must be true or false")
    return Stream(str(s["rtstream_id"]), str(s["name"]), tuple(str(m) for m in media), kind, store)


def _guess_type(name: str) -> str:
    prefix = name.split(":", 1)[0]
    return {"display": "screen", "screen": "screen", "system_audio": "system_audio"}.get(prefix, "mic")


def _cue(p: Path, i: int, e: Any, names: set[str]) -> Cue:
    where = f"scenario {p}:{e.get('_line')}" if isinstance(e, dict) and "_line" in e else f"scenario {p}: events[{i}]"
    if not isinstance(e, dict):
        raise StageError(f"{where}: expected a mapping")
    at = e.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool) or at < 0:
        raise StageError(f"{where}: `at` must be a number of seconds >= 0")
    raw_data = e.get("data")
    d: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    if e.get("event") == FAILED:
        return Cue(float(at), FAILED, "", str(e.get("error") or d.get("error") or "capture failed"))
    ch = e.get("channel")
    ch = "visual_index" if ch == "scene_index" else ch
    if ch not in CHANNELS:
        raise StageError(f"{where}: `channel` must be one of {', '.join(CHANNELS)} (got {ch!r})")
    stream = e.get("rtstream") or e.get("rtstream_name")
    if stream not in names:
        raise StageError(f"{where}: `rtstream` {stream!r} is not one of the scenario's rtstreams")
    text = e.get("text", d.get("text"))
    if not isinstance(text, str):
        raise StageError(f"{where}: `text` must be a string")
    label = str(e.get("label") or d.get("event_label") or "")
    if ch == "alert" and not label:
        raise StageError(f"{where}: an alert needs a `label`")
    span = e.get("span", DEFAULT_SPAN[ch])
    if not isinstance(span, int | float) or span < 0:
        raise StageError(f"{where}: `span` must be a number of seconds >= 0")
    is_final = e.get("is_final", d.get("is_final", True))
    return Cue(float(at), ch, str(stream), text, bool(is_final), float(min(span, at)), label)


def cue_event(scn: Scenario, cue: Cue, base_ms: int, session_id: str) -> dict[str, Any]:
    """The JSON event VideoDB would send for `cue`, timed from `base_ms` (ms at active)."""
    end = base_ms + round(cue.at * 1000)
    if cue.channel == FAILED:
        return {"event": FAILED, "capture_session_id": session_id, "status": "failed",
                "data": {"error": cue.text}}
    s = scn.stream(cue.stream)
    if cue.channel == "alert":
        data: dict[str, Any] = {"event_label": cue.label, "timestamp": end, "text": cue.text}
    else:
        data = {"text": cue.text, "start": end - round(cue.span * 1000), "end": end}
        if cue.channel == "transcript":
            data["is_final"] = cue.is_final
    return {"channel": cue.channel, "rtstream_id": s.rtstream_id, "rtstream_name": s.name, "data": data}


def lifecycle_event(status: str, session_id: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `capture_session.<status>` event in the seed's shape."""
    ev: dict[str, Any] = {"event": f"capture_session.{status}", "capture_session_id": session_id,
                          "status": status}
    if data is not None:
        ev["data"] = data
    return ev


def export_data(session_id: str) -> dict[str, Any]:
    """`capture_session.exported` data: a video id and the URLs to watch it."""
    video = "v_" + session_id.removeprefix("cap-").replace("-", "")[:12]
    stream = f"https://stream.videodb.io/v3/published/manifests/{video}.m3u8"
    return {"exported_video_id": video, "stream_url": stream,
            "player_url": f"https://console.videodb.io/player?url={stream}"}

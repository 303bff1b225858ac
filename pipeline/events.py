"""Helpers over plain-dict events: channel, text, event time and the receipt stamp.

Events stay the dicts VideoDB sends (fast, and any plugin can read them); these
functions are the one place that knows their shapes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

Event = dict[str, Any]
Batch = list[Event]

LIFECYCLE: Final = "capture_session"
LIFECYCLE_PREFIX: Final = "capture_session."
#: Longest rtstream_id / capture_session_id / rtstream_name accepted at the edge (they key stage state).
MAX_ID_CHARS: Final = 256
_ID_KEYS: Final = ("rtstream_id", "capture_session_id", "rtstream_name")
#: Channel names that mean the same thing; matching is done on the canonical one.
ALIASES: Final = {"scene_index": "visual_index"}


def channel(event: Event) -> str:
    """The event's channel; every lifecycle event is on `capture_session`."""
    ch = event.get("channel")
    if ch is None:
        return LIFECYCLE if "event" in event else ""
    return ch if isinstance(ch, str) else str(ch)


def oversized_id(event: Event) -> str | None:
    """Why a source refuses `event` (an id over MAX_ID_CHARS characters), or None when it is fine."""
    for key in _ID_KEYS:
        v = event.get(key)
        if v is not None and len(v if type(v) is str else str(v)) > MAX_ID_CHARS:
            return f"{key} longer than {MAX_ID_CHARS} characters"
    return None


def canonical(name: str) -> str:
    """Canonical channel name (`scene_index` -> `visual_index`)."""
    return ALIASES.get(name, name)


def channel_set(names: Iterable[str]) -> frozenset[str]:
    """Canonical set of channel names for fast membership tests."""
    return frozenset(canonical(n) for n in names)


def in_channels(event: Event, channels: frozenset[str]) -> bool:
    """True when the event's canonical channel is in a set made by `channel_set`."""
    ch = event.get("channel")
    if ch is None:
        return "event" in event and LIFECYCLE in channels
    if not isinstance(ch, str):
        return False
    return ALIASES.get(ch, ch) in channels


def data(event: Event) -> dict[str, Any]:
    d = event.get("data")
    return d if isinstance(d, dict) else {}


def text(event: Event) -> str:
    """The event's text (`data.text`), or "" when it has none."""
    d = event.get("data")
    if isinstance(d, dict):
        t = d.get("text")
        if isinstance(t, str):
            return t
    return ""


def _ms(v: Any, scale: int) -> int | None:
    if type(v) is int:
        return v * scale
    if type(v) is float:
        ms = v * scale
        if math.isfinite(ms):
            return int(ms)
    return None


def event_time_ms(event: Event) -> int:
    """Event time in ms: data.start, else data.timestamp, else unix_ts*1000, else 0."""
    d = event.get("data")
    if isinstance(d, dict):
        for key in ("start", "timestamp"):
            ms = _ms(d.get(key), 1)
            if ms is not None:
                return ms
    ms = _ms(event.get("unix_ts"), 1000)
    return 0 if ms is None else ms


def iso_ts(unix: float) -> str:
    """ISO-8601 UTC with milliseconds and `Z`, the seed listener's `ts` format."""
    dt = datetime.fromtimestamp(unix, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def stamp(event: Event, now: float | None = None) -> Event:
    """Add `ts`/`unix_ts` receipt stamps unless the event already has them."""
    if "unix_ts" not in event:
        unix = time.time() if now is None else now
        event["ts"] = iso_ts(unix)
        event["unix_ts"] = round(unix, 3)
    return event


class Stamper:
    """Stamps many events received in the same millisecond with one clock read.

    Why: formatting the timestamp per event is the costliest part of ingest.
    """

    __slots__ = ("_ms", "_ts", "_unix")

    def __init__(self) -> None:
        self._ms = -1
        self._ts = ""
        self._unix = 0.0

    def __call__(self, event: Event) -> Event:
        if "unix_ts" in event:
            return event
        now = time.time()
        ms = int(now * 1000)
        if ms != self._ms:
            self._ms = ms
            self._unix = ms / 1000
            self._ts = iso_ts(self._unix)
        event["ts"] = self._ts
        event["unix_ts"] = self._unix
        return event


def rtstream_label(event: Event) -> str:
    """`rtstream_name`, else `rtstream_id`, else "" (for display and keys)."""
    return str(event.get("rtstream_name") or event.get("rtstream_id") or "")


def lifecycle_status(event: Event) -> str | None:
    """`active` for `capture_session.active`, None for non-lifecycle events."""
    ev = event.get("event")
    if isinstance(ev, str) and ev.startswith(LIFECYCLE_PREFIX):
        return ev[len(LIFECYCLE_PREFIX):]
    return None

"""Helpers over plain-dict events: channel, text, event time and the receipt stamp.

Events stay the dicts VideoDB sends (fast, and any plugin can read them); these
functions are the one place that knows their shapes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import compress, repeat
from operator import countOf
from typing import Any, Final

import orjson

Event = dict[str, Any]
Batch = list[Event]

LIFECYCLE: Final = "capture_session"
LIFECYCLE_PREFIX: Final = "capture_session."
#: Channel names that mean the same thing; matching is done on the canonical one.
ALIASES: Final = {"scene_index": "visual_index"}

ALERT: Final = "alert"
#: The `channel` values of the alert channel: its name and every alias of it (today just `alert`).
ALERT_NAMES: Final = (ALERT, *(name for name, canon in ALIASES.items() if canon == ALERT))


def channel(event: Event) -> str:
    """The event's channel; every lifecycle event is on `capture_session`."""
    ch = event.get("channel")
    if ch is None:
        return LIFECYCLE if "event" in event else ""
    return ch if isinstance(ch, str) else str(ch)


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
        ev = event.get("event")
        return "event" in event and (LIFECYCLE in channels or (type(ev) is str and ev in channels))
    if not isinstance(ch, str):
        return False
    return ALIASES.get(ch, ch) in channels


def count_on(batch: Batch, names: tuple[str, ...]) -> int:
    """How many events of `batch` have one of `names` as their `channel`, as `channel()` and `canonical()` read it
    (a lifecycle event, with no `channel`, never counts). For a per-batch counter: one C-level pass over the
    batch per name, no Python per event (about 30 ns an event)."""
    return sum(countOf(map(dict.get, batch, repeat("channel")), name) for name in names)


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
    """ISO-8601 UTC with milliseconds and `Z`, the `ts` format of VideoDB's ws_listener.py."""
    dt = datetime.fromtimestamp(unix, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def iso_seconds(value: Any) -> float | None:
    """The Unix time of an `iso_ts` string (a saved record's `created_at`, `expires_at`, `stopped_at`); None when
    it is not one."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


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
    `keep=True` (files, Kafka): an event that has a `unix_ts` keeps its stamps, they are its receipt. `keep=False`
    (a live WebSocket): every event gets ours, so a peer cannot pick its receipt time (and with it the `{date}`
    a sink files it under, or the shape of `ts`).
    """

    __slots__ = ("_keep", "_ms", "_ts", "_unix")

    def __init__(self, keep: bool = True) -> None:
        self._keep = keep
        self._ms = -1
        self._ts = ""
        self._unix = 0.0

    def __call__(self, event: Event) -> Event:
        if self._keep and "unix_ts" in event:
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


# -- the edge check: what every source refuses before an event enters the pipeline ----------

#: Deepest nesting accepted (`{}` is 1 level). orjson reads 1024 levels but writes only 254;
#: 240 leaves room for the envelopes events are wrapped in (dead letter, webhook bodies).
MAX_DEPTH: Final = 240
#: Longest `rtstream_id` / `capture_session_id` / `rtstream_name` accepted: they key per-stream state.
MAX_ID_CHARS: Final = 512
ID_FIELDS: Final = ("rtstream_id", "capture_session_id", "rtstream_name")
#: A frame of at most this many bytes (or characters) can break neither limit, so it is not looked at:
#: nesting deeper than MAX_DEPTH takes 2 * (MAX_DEPTH + 1) bytes, an id over MAX_ID_CHARS more still.
EDGE_FREE: Final = 2 * MAX_DEPTH + 1
assert MAX_ID_CHARS >= EDGE_FREE


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when `value` nests dicts/lists more than `limit` levels; iterative, stops at the first."""
    if type(value) is not dict and type(value) is not list:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > limit:
            return True
        for child in (node.values() if type(node) is dict else node):
            if type(child) is dict or type(child) is list:
                push((child, depth + 1))
    return False


def _openings(raw: bytes | str) -> int:
    if isinstance(raw, bytes):
        return raw.count(b"{") + raw.count(b"[")
    return raw.count("{") + raw.count("[")


def deeper_than(raw: bytes | str, value: Any, limit: int = MAX_DEPTH) -> bool:
    """`too_deep(value)` for a value parsed from `raw`, walking only when `raw` could nest that deep."""
    return len(raw) > 2 * limit and _openings(raw) > limit and too_deep(value, limit)


def _bad_id(value: Any, name: str) -> str | None:
    """Why an id is too long to key state by (a list or object counts as its JSON text), or None."""
    if type(value) is str:
        size = len(value)
    elif isinstance(value, dict | list):
        try:
            size = len(orjson.dumps(value))
        except TypeError:  # nested past what JSON writes: certainly too long
            size = MAX_ID_CHARS + 1
    else:  # numbers, booleans, null: a few characters at most
        return None
    if size > MAX_ID_CHARS:
        return f"{name} of {size} characters exceeds {MAX_ID_CHARS}"
    return None


def edge_reason(raw: bytes | str, event: Event) -> str | None:
    """Why a source must dead-letter `event` (parsed from `raw`) instead of accepting it, or None.

    Free for frames of at most EDGE_FREE bytes; otherwise a few lookups, and a walk
    only when the frame holds more than MAX_DEPTH opening brackets.
    """
    if len(raw) <= EDGE_FREE:
        return None
    for name in ID_FIELDS:
        if name in event:
            bad = _bad_id(event[name], name)
            if bad is not None:
                return bad
    if "event" in event:  # lifecycle: `data.rtstreams[].rtstream_id` become state keys too
        d = event.get("data")
        streams = d.get("rtstreams") if isinstance(d, dict) else None
        if isinstance(streams, list):
            for s in streams:
                if isinstance(s, dict) and "rtstream_id" in s:
                    bad = _bad_id(s["rtstream_id"], "data.rtstreams[].rtstream_id")
                    if bad is not None:
                        return bad
    if deeper_than(raw, event):
        return f"nested deeper than {MAX_DEPTH} levels"
    return None


def edge_rejects(raws: list[bytes], events: list[Any]) -> list[tuple[int, str]]:
    """(index, reason) of the events `edge_reason` refuses, for raws/events parsed in step.

    The replay hot path: two C-level passes over the chunk's lengths; Python looks only at
    frames longer than EDGE_FREE (a few percent of real traffic).
    """
    lens = list(map(len, raws))
    if not lens or max(lens) <= EDGE_FREE:
        return []
    out: list[tuple[int, str]] = []
    for i in compress(range(len(lens)), map(EDGE_FREE.__lt__, lens)):
        reason = edge_reason(raws[i], events[i])
        if reason is not None:
            out.append((i, reason))
    return out

"""Processor `window`: event-time windows that emit one `metrics` event per key and window.

Tumbling (`slide` = `size`, the default) or sliding windows aligned to the Unix
epoch, on event time (`data.start`, else `data.timestamp`, else `unix_ts`), so
a replay at any speed emits the same metrics. A window closes once the newest
event time seen is `allowed_lateness` past its end; an event more than
`allowed_lateness` older than the newest event time is late: counted, never
aggregated, and passed on unchanged like every other event. Open windows live
in `context.state` (a faust table on the faust runtime); `flush()` closes them
all at the end of a run.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson
from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.api import Batch, Context, Event, Options, Processor
from pipeline.events import ALIASES, LIFECYCLE, event_time_ms, iso_ts
from pipeline.types import Duration
from stages.processors.window_saved import same_config, well_formed

METRICS: Final = "metrics"
WATERMARK: Final = "~watermark"  # reserved state key (window keys are JSON arrays, so start with "[")
MAX_TEXT: Final = 500  # first_text / last_text are cut to this many characters
MAX_KEY_CHARS: Final = 256  # a key value from the wire is cut to this many characters
MAX_KEYWORDS: Final = 100  # distinct matched keywords remembered per window
MAX_CHANNELS: Final = 32  # distinct channel names counted apart per window (names come off the wire)
MAX_LABELS: Final = 100  # distinct alert labels counted apart per window
OTHER: Final = "(other)"  # where the rest, and names longer than MAX_KEY_CHARS, are counted
MAX_SPAN_S: Final = 366 * 86400  # longest window size and allowed_lateness
MAX_TIME: Final = 1 << 53  # event times beyond ±2^53 ms (285,000 years) count as late
FUTURE_SLACK_MS: Final = 86_400_000  # an event time more than a day ahead of the wall clock counts as late
MAX_TALK_MS: Final = 86_400_000  # a transcript longer than a day adds no talk time (as in `pipeline report`)


class WindowOptions(Options):
    size: Duration = Field(description="window length, in event time (e.g. 60s)")
    slide: Duration | None = Field(default=None, description="start a window this often; default = size (tumbling)")
    key: list[str] = Field(default_factory=lambda: ["capture_session_id"],
                           description="top-level event fields that group windows")
    allowed_lateness: Duration = Field(default=0.0, description="how far behind the newest event time an event "
                                                                "may be and still count")
    max_open_windows: int = Field(default=10000, ge=1, description="more open windows close the oldest early")

    @field_validator("size")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 0.001:
            raise ValueError("size must be at least 1ms")
        return v

    @field_validator("size", "allowed_lateness")
    @classmethod
    def _within_a_year(cls, v: float, info: ValidationInfo) -> float:
        # longer windows made `metrics` whose bounds no JSON integer holds: every one dead-lettered, exit code 0
        if v > MAX_SPAN_S:
            raise ValueError(f"{info.field_name} must be at most 366 days")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: list[str]) -> list[str]:
        if any(not k for k in v) or len(set(v)) != len(v):
            raise ValueError("key fields must be distinct non-empty names")
        return v

    @model_validator(mode="after")
    def _slide(self) -> WindowOptions:
        if self.slide is not None and not 0.001 <= self.slide <= self.size:
            raise ValueError("slide must be between 1ms and size (windows may overlap, not leave gaps)")
        per_event = round(self.size * 1000) // max(1, round((self.slide or self.size) * 1000))
        if per_event > self.max_open_windows:  # each event alone would evict: 1 s per event, a flood of partials
            raise ValueError(f"size / slide puts every event in {per_event} windows, more than max_open_windows "
                             f"({self.max_open_windows}): use a longer slide or raise max_open_windows")
        return self


def _key_value(v: Any) -> Any:
    """A key value safe to hash, store as JSON and show: str/int/bool/None kept (long strings cut)."""
    if v is None or type(v) is bool or (type(v) is int and -(1 << 63) <= v < 1 << 63):
        return v
    s = v if isinstance(v, str) else str(v)
    return s[:MAX_KEY_CHARS]


_BOOL: Final = object()  # tags a boolean key value: True == 1 as a dict key, so it would share 1's window


def _safe_key(raw: tuple[Any, ...]) -> tuple[Any, ...]:
    """The key of a window inside the stage: `_key_value`s, booleans tagged (`_values` gives them back)."""
    return tuple((_BOOL, v) if type(v) is bool else _key_value(v) for v in raw)


def _values(kt: tuple[Any, ...]) -> list[Any]:
    return [v[1] if type(v) is tuple else v for v in kt]  # a tuple is a tagged boolean (no other value is one)


def _new(key: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """An empty accumulator (plain JSON types, so any state store can persist it)."""
    return {"key": key, "start": start, "end": end, "events": {}, "words": 0, "talk_ms": 0, "alerts": {},
            "keywords": [], "ft": None, "first": None, "lt": None, "last": None}


def _add(acc: dict[str, Any], event: Event, ch: str, t: int) -> None:
    """Fold one event into an accumulator."""
    events = acc["events"]
    name = ch
    n = events.get(name)
    if n is None:  # a new name: bounded, so hostile channel names cannot grow the state (saved every batch)
        if len(events) >= MAX_CHANNELS or len(name) > MAX_KEY_CHARS:
            name = OTHER
        n = events.get(name, 0)
    events[name] = n + 1
    data = event.get("data")
    if not isinstance(data, dict):
        return
    text = data.get("text")
    if ch == "transcript":
        if data.get("is_final") is False:
            return  # interim transcripts count as events only
        if isinstance(text, str):
            acc["words"] += len(text.split())
        e = data.get("end")
        # from the event time (`data.start` as a rule), as `pipeline report` and the parquet `start` column do:
        # a float or missing `data.start` added nothing here, but `end` minus the event time there.
        # `end` comes off the wire: one end of 2^64 made talk_seconds 1.8e16 and, twice, a sum past 64 bits
        # that the state store could no longer save
        if type(e) is int and 0 < e - t <= MAX_TALK_MS:
            acc["talk_ms"] += e - t
    elif ch == "alert":
        label = data.get("event_label")
        label = label[:MAX_KEY_CHARS] if isinstance(label, str) else "unknown"
        alerts = acc["alerts"]
        if label not in alerts and len(alerts) >= MAX_LABELS:
            label = OTHER
        alerts[label] = alerts.get(label, 0) + 1
        matched = data.get("matched")
        if isinstance(matched, list):
            kws = acc["keywords"]
            for m in matched:
                if isinstance(m, str) and len(kws) < MAX_KEYWORDS:
                    m = m[:MAX_KEY_CHARS]  # cut before the check: a long keyword is one keyword, not one per alert
                    if m not in kws:
                        kws.append(m)
    if isinstance(text, str) and text:
        if acc["ft"] is None or t < acc["ft"]:
            acc["ft"], acc["first"] = t, text[:MAX_TEXT]
        if acc["lt"] is None or t >= acc["lt"]:
            acc["lt"], acc["last"] = t, text[:MAX_TEXT]


def metrics_event(acc: dict[str, Any], *, evicted: bool = False) -> Event:
    """The `metrics` event for a closed window; key fields are copied to the top level for routing."""
    end = acc["end"]
    out: Event = {"channel": METRICS}
    for k, v in acc["key"].items():
        if v is not None and k not in ("channel", "window", "key", "data"):
            out[k] = v
    unix = end / 1000
    try:
        out["ts"] = iso_ts(unix)
        out["unix_ts"] = unix
    except (OverflowError, ValueError, OSError):
        pass
    out["window"] = {"start": acc["start"], "end": end}
    out["key"] = dict(acc["key"])
    out["data"] = {"events": dict(acc["events"]), "words": acc["words"], "talk_seconds": acc["talk_ms"] / 1000,
                   "alerts": dict(acc["alerts"]), "keywords": sorted(acc["keywords"]),
                   "first_text": acc["first"], "last_text": acc["last"]}
    if evicted:
        out["evicted"] = True
    return out


class Window(Processor):
    """Counts, words, talk time, alerts and keywords per key and event-time window, as `metrics` events."""

    name = "window"
    Options = WindowOptions

    def __init__(self, options: WindowOptions, context: Context) -> None:
        super().__init__(options, context)
        self._size = max(1, round(options.size * 1000))  # round: 1.001 s * 1000 is 1000.999...
        self._slide = max(1, round((options.slide or options.size) * 1000))
        self._lateness = round(options.allowed_lateness * 1000)
        self._fields = tuple(options.key)
        self._store = context.state.get(self.state_name(context.stage))  # state key -> accumulator
        self._min_end: int | None = None  # smallest end among open windows; None = unknown (scan the store)
        self._local: dict[tuple[Any, int], dict[str, Any]] = {}  # windows touched by the current batch
        self._pending: Batch = []  # metrics of windows evicted during the current batch
        self._names: dict[tuple[Any, int], str] = {}  # (key, start) -> state key, for the current batch
        self.late = 0
        self.emitted = 0
        self.evicted = 0
        self._adopted = False  # saved windows looked at (at the first batch: a faust table is recovered by then)

    @staticmethod
    def state_name(stage: str) -> str:
        """The stage state holding the open windows of the window stage labelled `stage` (a reload moves it)."""
        return f"window:{stage}"

    def report(self) -> dict[str, int]:
        return {"late": self.late, "windows": self.emitted, "evicted": self.evicted}

    def process(self, batch: Batch) -> Batch:
        if not self._adopted:
            self._adopt()
        store = self._store
        wm = store.get(WATERMARK)
        wm = None if type(wm) is not int else wm
        size, slide, lateness, fields = self._size, self._slide, self._lateness, self._fields
        single = fields[0] if len(fields) == 1 else None
        touched = self._local
        touched.clear()
        self._names.clear()
        keys: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # raw key values -> safe key, per batch
        tumbling = size == slide
        last_s: int | None = None
        last_kt: tuple[Any, ...] | None = None
        last_acc: dict[str, Any] = {}
        late = 0
        now = int(time.time() * 1000)
        ceiling = min(MAX_TIME, now + FUTURE_SLACK_MS)
        failed: Batch = []
        for event in batch:
            try:  # one bad event (not a dict, a plugin's odd value) costs only itself, see below
                ch = event.get("channel")
                if ch == METRICS:
                    continue
                if ch is None:
                    ch = LIFECYCLE if "event" in event else ""
                elif not isinstance(ch, str):
                    ch = str(ch)
                else:
                    ch = ALIASES.get(ch, ch)
                data = event.get("data")
                start = data.get("start") if isinstance(data, dict) else None
                t = start if type(start) is int else event_time_ms(event)
                if not -MAX_TIME <= t <= ceiling:  # no real clock says this; it would poison the watermark
                    late += 1
                    continue
                if wm is None or t > wm:
                    # ahead of the wall clock (a skewed clock, a peer's bogus time): counted, but the watermark
                    # stops at now; one event 23 h ahead closed every window and made the next 23 h all late
                    wm = t if t <= now else (now if wm is None else max(wm, now))
                elif t < wm - lateness:
                    late += 1
                    continue
                raw = (event.get(single),) if single is not None else tuple(map(event.get, fields))
                try:
                    kt = keys.get(raw)
                except TypeError:  # an unhashable value (list, dict): its string form is the key
                    kt = _safe_key(raw)
                if kt is None:
                    kt = _safe_key(raw)
                    # only strings are remembered: raw values that are equal but of other types (True, 1, 1.0)
                    # are different keys, and shared the window of whichever came first in the batch
                    if all(v is None or type(v) is str for v in raw):
                        keys[raw] = kt
                s = t - t % slide
                if tumbling:  # one window per event; consecutive events mostly share it
                    if s != last_s or kt is not last_kt:
                        last_s, last_kt = s, kt
                        found = touched.get((kt, s))
                        last_acc = found if found is not None else self._open(kt, s)
                        touched[(kt, s)] = last_acc
                    _add(last_acc, event, ch, t)
                    continue
                while s > t - size:
                    acc = touched.get((kt, s))
                    if acc is None:
                        acc = touched[(kt, s)] = self._open(kt, s)
                    _add(acc, event, ch, t)
                    s -= slide
            except Exception as exc:
                # Handled here, not by the chain's event-by-event retry: the events before it are already
                # folded into the windows, and a retry would count them twice.
                failed.append(event)
                self.context.stats.errors += 1
                self.context.dead_letter.write(f"{type(exc).__name__}: {exc}", stage=self.context.stage,
                                               event=event)
        self.late += late
        if wm is not None:
            store[WATERMARK] = wm
        names = self._names
        for ks, acc in touched.items():
            store[names[ks]] = acc  # reassigned so a table or a persistent store records the change
        touched.clear()
        names.clear()
        closed = self._close_due(wm - lateness) if wm is not None else self._take_pending()
        if failed:  # dead-lettered: not passed on
            gone = {id(e) for e in failed}
            batch = [e for e in batch if id(e) not in gone]
        if not closed:
            return batch
        self.context.state.note(closed)  # their windows leave the state now: kept there until the sinks have them
        return batch + closed

    def flush(self) -> Batch:
        """Close every open window (end of the run)."""
        if not self._adopted:
            self._adopt()
        closed = self._close_due(None)
        self.context.state.note(closed)
        return closed

    # -- state -----------------------------------------------------------------------------------
    def _adopt(self) -> None:
        """Take over the saved windows: drop damaged entries and a watermark no clock gives (one warning
        each), and close those another config opened (another size, slide or key) at this batch, as a
        reload that changes the options does, so this config's events never count under their bounds."""
        self._adopted = True
        store, log, stage = self._store, self.context.log, self.context.stage
        self._take_orphans()
        wm = store.get(WATERMARK)
        ceiling = min(MAX_TIME, int(time.time() * 1000) + FUTURE_SLACK_MS)
        if wm is not None and (type(wm) is not int or not -MAX_TIME <= wm <= ceiling):
            del store[WATERMARK]
            log.warning("%s: saved newest event time %.40r is no time a clock gives (damaged, or saved under a "
                        "clock set ahead); ignored", stage, wm)
        bad: list[Any] = []
        other: list[tuple[int, str]] = []
        for k, acc in store.items():
            if k == WATERMARK:
                continue
            if not well_formed(k, acc):
                bad.append(k)
            elif not same_config(acc, self._size, self._slide, self._fields):
                other.append((acc["end"], k))
        for k in bad:
            del store[k]
        if bad:
            log.warning("%s: dropped %d saved window(s) that cannot be read (damaged, or saved by another "
                        "version); their counts are lost", stage, len(bad))
        if other:
            other.sort()
            self._pending += [metrics_event(store.pop(k)) for _, k in other]
            self.emitted += len(other)
            log.warning("%s: closed %d saved window(s) of another size, slide or key (the config changed "
                        "since they were saved)", stage, len(other))
        self._min_end = None

    def _take_orphans(self) -> None:
        """With nothing saved under its own label, take over the windows saved by window stages the config no
        longer has at theirs (a processor added in front of it between two runs moved it: stages[0] to
        stages[1]); `_adopt` then resumes those of this config and closes the others. Before, they stayed in
        state.db, never emitted."""
        store, state = self._store, self.context.state
        if any(k != WATERMARK for k in store):
            return
        prefix = self.state_name("")
        for name in state.unclaimed():
            if not name.startswith(prefix):
                continue
            orphan = state.get(name)
            for k in list(orphan):
                v = orphan.pop(k)  # a deletion saved with this batch, as the windows' new place is
                if k == WATERMARK:
                    if type(v) is int and (type(store.get(WATERMARK)) is not int or v > store[WATERMARK]):
                        store[WATERMARK] = v
                elif k not in store:
                    store[k] = v
            self.context.log.warning("%s: took over the windows saved by %s, a window stage this config no "
                                     "longer has at that place", self.context.stage, name[len(prefix):])

    def _take_pending(self) -> Batch:
        pending, self._pending = self._pending, []
        return pending

    def _skey(self, kt: tuple[Any, ...], start: int) -> str:
        return orjson.dumps([start, *_values(kt)]).decode()

    def _open(self, kt: tuple[Any, ...], start: int) -> dict[str, Any]:
        store = self._store
        skey = self._names[(kt, start)] = self._skey(kt, start)
        acc = store.get(skey)
        if acc is None:
            if len(store) - (WATERMARK in store) >= self.options.max_open_windows:
                self._evict()
            acc = _new(dict(zip(self._fields, _values(kt), strict=True)), start, start + self._size)
            store[skey] = acc
            if self._min_end is not None and acc["end"] < self._min_end:
                self._min_end = acc["end"]
        return acc

    def _evict(self) -> None:
        """Too many open windows: close the tenth that ends first now (bounded state beats completeness).

        A tenth at a time, so a flood of new keys costs one scan per `max_open_windows / 10` windows.
        """
        items = sorted((acc["end"], k) for k, acc in self._store.items() if k != WATERMARK)
        for _, k in items[: max(1, self.options.max_open_windows // 10)]:
            acc = self._store.pop(k)
            # not written back after the batch
            self._local.pop((_safe_key(tuple(acc["key"].values())), acc["start"]), None)
            self.evicted += 1
            self.emitted += 1
            self._pending.append(metrics_event(acc, evicted=True))

    def _close_due(self, upto: int | None) -> Batch:
        """Emit and forget windows whose end <= upto (all when None), ordered by end, then key."""
        pending = self._take_pending()
        if upto is not None and self._min_end is not None and upto < self._min_end:
            return pending
        store = self._store
        due: list[tuple[int, str]] = []
        min_end: int | None = None
        for k, acc in store.items():
            if k == WATERMARK:
                continue
            end = acc["end"]
            if upto is None or end <= upto:
                due.append((end, k))
            elif min_end is None or end < min_end:
                min_end = end
        self._min_end = min_end if min_end is not None else (upto + 1 if upto is not None else None)
        if not due:
            return pending
        due.sort()
        out = pending
        for _, k in due:
            out.append(metrics_event(store.pop(k)))
        self.emitted += len(due)
        return out

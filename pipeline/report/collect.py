"""Read the pipeline's JSONL output line by line into bounded per-session summaries.

Memory stays bounded whatever the input size: marks per lane and channel are thinned
evenly past a cap, alert rows, keywords, lifecycle entries, lanes, sessions and
the duplicate filter all have caps, and every text is cut; marks, alert rows,
lifecycle entries, keywords and backfill spans also share one budget of bytes for
all sessions (`keep.Budget`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.events import canonical, channel, deeper_than, event_time_ms, lifecycle_status
from pipeline.report.keep import Budget, Earliest, Track

MAX_LINE: Final = 1 << 20  # longer lines are skipped (counted)
MAX_TEXT: Final = 400  # characters of text kept per mark / alert row
MAX_ID: Final = 256  # a longer rtstream id in a lifecycle event's stream list is not remembered
MAX_MARKS: Final = 1500  # marks drawn per lane and channel; past it every other one is dropped...
MAX_ALERTS: Final = 2000  # alert rows per session
MAX_LANES: Final = 32  # rtstreams per session; more go into one "other streams" lane
MAX_SESSIONS: Final = 200
MAX_KEYWORDS: Final = 500
MAX_LIFECYCLE: Final = 500
MAX_CHANNELS: Final = 32  # channel names counted apart per session; the rest count as "other channels"
MAX_SECONDS: Final = 1_000_000  # distinct event-time seconds remembered, all sessions together (gap detection)
MAX_GAPS: Final = 500  # stretches without events drawn and listed per session: the longest
MAX_DEDUPE: Final = 2_000_000  # line digests remembered to drop the same event found in two files
RECENT_DEDUPE: Final = 65_536  # the last file's latest line digests: a batch a sink wrote twice counts once
# bytes of marks, alert rows, lifecycle entries, keywords and backfill spans kept, all sessions together. It always
# holds: keywords and spans, never dropped, take at most 75 MB (200 sessions x 500 each), and one mark per track,
# the least the tracks keep, 55 MB (200 x 33 lanes x 4 channels of 400 characters stored 4 bytes each)
MAX_KEPT: Final = 128 << 20
_TRACKED: Final = frozenset(("transcript", "visual_index", "audio_index"))  # what a backfill fetches again
ITEM_BYTES: Final = 200  # what a kept mark, row or entry holds besides its texts (measured: 200, 228, 100)
SPAN_BYTES: Final = 150  # a backfill span (measured: 144)
MARK_CHANNELS: Final = ("transcript", "audio_index", "visual_index", "alert")
UNKNOWN_SESSION: Final = "unknown-session"


@dataclass(slots=True)
class Mark:
    """One drawn event: a span (or instant) on a lane's channel track."""

    id: int
    start: int
    end: int
    channel: str
    text: str
    backfill: bool
    label: str = ""  # alerts: event_label

    def size(self) -> int:
        """Bytes it holds (its texts as Python stores them: 4 bytes a character if one is an emoji)."""
        return ITEM_BYTES + sys.getsizeof(self.text) + sys.getsizeof(self.label)


@dataclass(slots=True)
class AlertRow:
    mark: int
    time: int
    label: str
    severity: str
    lane: str
    text: str
    matched: list[str]
    origin: str

    def size(self) -> int:
        texts = (self.label, self.severity, self.text, self.origin, *self.matched)
        return ITEM_BYTES + sys.getsizeof(self.matched) + sum(map(sys.getsizeof, texts))


def _entry_size(entry: tuple[int, str]) -> int:
    return ITEM_BYTES + sys.getsizeof(entry[1])


@dataclass
class Lane:
    """One rtstream: a track of marks per channel, talk time and words."""

    name: str
    budget: Budget
    tracks: dict[str, Track[Mark]] = field(default_factory=dict)
    talk_ms: int = 0
    words: int = 0

    @property
    def seen(self) -> int:
        return sum(t.seen for t in self.tracks.values())

    @property
    def marks(self) -> list[Mark]:
        return [m for t in self.tracks.values() for m in t.marks]

    def add(self, mark: Mark) -> None:
        track = self.tracks.get(mark.channel)
        if track is None:
            track = self.tracks[mark.channel] = Track(MAX_MARKS, Mark.size, self.budget)
        track.add(mark)


@dataclass
class Session:
    id: str
    budget: Budget
    lanes: dict[str, Lane] = field(default_factory=dict)
    alerts: Earliest[AlertRow] = field(init=False)
    keywords: dict[str, int] = field(default_factory=dict)
    keywords_uncounted: int = 0  # matches of keywords past the first MAX_KEYWORDS distinct ones
    lifecycle: Track[tuple[int, str]] = field(init=False)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: set[int] = field(default_factory=set)
    backfill: int = 0
    backfill_spans: list[list[int]] = field(default_factory=list)
    t_min: int | None = None
    t_max: int | None = None

    def __post_init__(self) -> None:
        self.alerts = Earliest(MAX_ALERTS, AlertRow.size, self.budget)
        self.lifecycle = Track(MAX_LIFECYCLE, _entry_size, self.budget)

    @property
    def alerts_total(self) -> int:
        return self.alerts.seen

    def lane(self, name: str) -> Lane:
        lane = self.lanes.get(name)
        if lane is None:
            if len(self.lanes) >= MAX_LANES:
                name = "other streams"
                lane = self.lanes.get(name)
            if lane is None:
                lane = self.lanes[name] = Lane(name, self.budget)
        return lane

    def span(self, t: int, remember: bool = True) -> None:
        if t <= 0:
            return
        if self.t_min is None or t < self.t_min:
            self.t_min = t
        if self.t_max is None or t > self.t_max:
            self.t_max = t
        if remember:
            self.seconds.add(t // 1000)

    def gaps(self, min_gap_ms: int) -> list[tuple[int, int]]:
        """Stretches of at least `min_gap_ms` without any event (by event time)."""
        secs = sorted(self.seconds)
        return [(a * 1000 + 1000, b * 1000) for a, b in itertools.pairwise(secs)
                if (b - a - 1) * 1000 >= min_gap_ms]

    def longest_gaps(self, min_gap_ms: int, cap: int = MAX_GAPS) -> tuple[list[tuple[int, int]], int]:
        """At most `cap` of `gaps()`, the longest, in time order, and how many there are in all.

        A sparse session (or hostile times) has one gap per distinct second: the page must stay bounded.
        """
        found = self.gaps(min_gap_ms)
        if len(found) <= cap:
            return found, len(found)
        return sorted(heapq.nlargest(cap, found, key=lambda g: g[1] - g[0])), len(found)


@dataclass
class Collected:
    sessions: dict[str, Session] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    lines: int = 0
    skipped: int = 0
    duplicates: int = 0
    metrics: int = 0
    left_out: int = 0  # events of sessions past MAX_SESSIONS
    dead_letters: int = 0  # dead-letter records found in a file whose name does not say so


def _cut(v: Any, n: int = MAX_TEXT) -> str:
    s = v if isinstance(v, str) else ("" if v is None else str(v))
    return s if len(s) <= n else s[: n - 1] + "…"


def read_lines(path: Path) -> Iterator[bytes | None]:
    """Lines of a file, read in bounded pieces; None for a line longer than MAX_LINE (skipped)."""
    with open(path, "rb") as fh:
        while True:
            line = fh.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = fh.readline(MAX_LINE)
                yield None
                continue
            yield line


class Collector:
    """Feeds events into per-session summaries; one instance per report run."""

    def __init__(self) -> None:
        self.out = Collected()
        self._digests: set[bytes] = set()
        self._recent: set[bytes] = set()  # the last file's latest lines, at most RECENT_DEDUPE (in _order)
        self._order: deque[bytes] = deque()
        self._stream_session: dict[str, str] = {}
        self._stream_name: dict[str, str] = {}
        self._mark_id = 0
        self._seconds = 0  # in all sessions' `seconds`
        # one budget for all sessions: caps per session let 200 sessions x 33 lanes x 4 channels x 1,500 marks
        # of up to 400 characters each hold ~90 GB (10 such sessions: 4.7 GB max RSS)
        self._budget = Budget(MAX_KEPT)

    def _remember_recent(self, digest: bytes) -> None:
        self._recent.add(digest)
        self._order.append(digest)
        if len(self._order) > RECENT_DEDUPE:
            self._recent.discard(self._order.popleft())

    def read(self, paths: Iterable[Path]) -> Collected:
        paths = list(paths)
        self._learn_all_streams(paths)
        for i, path in enumerate(paths):
            self.out.files.append(str(path))
            # every line of a file but the last is remembered (the next files may repeat it); of the last (or
            # only) file, just its latest lines: a line is written twice there only by a sink delivering a batch
            # again after a crash, and that batch follows closely. Before, every line's digest was kept, ~90
            # bytes each (3M events in one file: 217 MB, now 54 MB)
            remember = i < len(paths) - 1
            for line in read_lines(path):
                self.out.lines += 1
                if line is None:
                    self.out.skipped += 1
                    continue
                line = line.strip()
                if not line:
                    continue
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.out.skipped += 1
                    continue
                # nested past what the pipeline writes (240 levels): str() of a field 1,000 deep raised
                # RecursionError, a traceback for the whole report
                if not isinstance(event, dict) or deeper_than(line, event):
                    self.out.skipped += 1
                    continue
                digest = hashlib.blake2b(identity(event, line, self._session_id(event)), digest_size=12).digest()
                if digest in self._digests or digest in self._recent:
                    self.out.duplicates += 1
                    continue
                if not remember:
                    self._remember_recent(digest)
                elif len(self._digests) < MAX_DEDUPE:
                    self._digests.add(digest)
                if is_dead_letter(event):
                    self.out.dead_letters += 1
                else:
                    self.add(event)
        return self.out

    def _learn_all_streams(self, paths: list[Path]) -> None:
        """A first, light pass: the stream lists of the lifecycle events, wherever they are. Before, an event
        read before the list of its stream (`alert.jsonl` sorts before `capture_session.jsonl`) went to
        `unknown-session`. The main pass learns them again in order, so where a stream id is listed by several
        sessions an event still goes to the one listed last before it."""
        for path in paths:
            for line in read_lines(path):
                if line is None or b'"rtstreams"' not in line:  # only lifecycle lines are parsed
                    continue
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if (isinstance(event, dict) and lifecycle_status(event) is not None
                        and isinstance(event.get("data"), dict) and not deeper_than(line, event)):
                    self._learn_streams(event, event["data"])

    def _session_id(self, event: dict[str, Any]) -> str:
        sid = event.get("capture_session_id")
        if not isinstance(sid, str) or not sid:
            rid = event.get("rtstream_id")
            sid = self._stream_session.get(rid, UNKNOWN_SESSION) if isinstance(rid, str) else UNKNOWN_SESSION
        return _cut(sid, 200)

    def _session(self, event: dict[str, Any]) -> Session | None:
        sid = self._session_id(event)
        sessions = self.out.sessions
        s = sessions.get(sid)
        if s is None:
            if len(sessions) >= MAX_SESSIONS:
                return None
            s = sessions[sid] = Session(sid, self._budget)
        return s

    def add(self, event: dict[str, Any]) -> None:
        ch = canonical(channel(event))
        if ch == "metrics":
            self.out.metrics += 1
            return
        status = lifecycle_status(event)
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        if status is not None:
            self._learn_streams(event, data)
        session = self._session(event)
        if session is None:
            self.out.left_out += 1
            return
        t = event_time_ms(event)
        # one budget for all sessions: 1M per session let 200 sessions hold 200M
        # (3M events in 200 sessions: 234 MB max RSS, now 169 MB)
        before = len(session.seconds)
        session.span(t, self._seconds < MAX_SECONDS)
        self._seconds += len(session.seconds) - before
        counts = session.counts
        key = ch or "unknown"
        if key not in counts and (len(counts) >= MAX_CHANNELS or len(key) > 80):  # channel names off the wire
            key = "other channels"
        counts[key] = counts.get(key, 0) + 1
        backfill = event.get("backfill") is True
        if backfill:
            session.backfill += 1
            spans = session.backfill_spans
            if spans and spans[-1][0] - 30_000 <= t <= spans[-1][1] + 30_000:
                spans[-1][0], spans[-1][1] = min(spans[-1][0], t), max(spans[-1][1], t)
            elif len(spans) < 500:
                spans.append([t, t])
                self._budget.charge(SPAN_BYTES)
        if status is not None:
            session.lifecycle.add((t, _cut(status, 40)))
            return
        if ch not in MARK_CHANNELS:
            return
        lane = session.lane(self._lane_name(event))
        end = data.get("end")
        end = end if type(end) is int and t <= end <= t + 86_400_000 else t
        text = data.get("text")
        if ch == "transcript":
            if data.get("is_final") is False:
                return
            if isinstance(text, str):
                lane.words += len(text.split())
            lane.talk_ms += end - t
        self._mark_id += 1
        label = _cut(data.get("event_label") or "alert", 80) if ch == "alert" else ""
        mark = Mark(self._mark_id, t, end, ch, _cut(text), backfill, label)
        if ch == "alert":
            self._alert(session, lane, mark, data, event)
        lane.add(mark)

    def _alert(self, session: Session, lane: Lane, mark: Mark, data: dict[str, Any],
               event: dict[str, Any]) -> None:
        raw = data.get("matched")  # off the wire: a number raised TypeError, a string counted its letters
        matched = [_cut(m, 80) for m in raw[:100] if isinstance(m, str)][:20] if isinstance(raw, list) else []
        for m in matched:
            if m in session.keywords:
                session.keywords[m] += 1
            elif len(session.keywords) < MAX_KEYWORDS:
                session.keywords[m] = 1
                self._budget.charge(ITEM_BYTES + sys.getsizeof(m))
            else:
                session.keywords_uncounted += 1
        session.alerts.add(AlertRow(mark.id, mark.start, mark.label, _cut(data.get("severity") or "", 20),
                                    lane.name, mark.text, matched, _cut(event.get("origin") or "videodb", 20)))

    def _learn_streams(self, event: dict[str, Any], data: dict[str, Any]) -> None:
        sid = event.get("capture_session_id")
        streams = data.get("rtstreams")
        if not isinstance(sid, str) or not isinstance(streams, list):
            return
        sid = _cut(sid, 200)
        for s in streams[:MAX_LANES * 4]:
            rid = s.get("rtstream_id") if isinstance(s, dict) else None
            # 100,000 streams remembered, each id and name short: a line may be a MiB, these live to the end
            if isinstance(rid, str) and len(rid) <= MAX_ID and len(self._stream_session) < 100_000:
                self._stream_session[rid] = sid
                if isinstance(s.get("name"), str):
                    self._stream_name[rid] = _cut(s["name"], 80)

    def _lane_name(self, event: dict[str, Any]) -> str:
        name = event.get("rtstream_name")
        if not isinstance(name, str) or not name:
            rid = event.get("rtstream_id")
            name = self._stream_name.get(rid, rid) if isinstance(rid, str) else None
        return _cut(name or "no stream", 80)


def identity(event: dict[str, Any], line: bytes, session: str) -> bytes:
    """What tells two lines apart as events: for a transcript or index event its session, stream, channel,
    times, text and finality (a restart's backfill writes again what the crashed run wrote, stamped afresh and
    marked `"backfill": true`: a different line, the same event); for any other line, the line itself."""
    data = event.get("data")
    if event.get("channel") not in _TRACKED or not isinstance(data, dict) or type(data.get("start")) not in (int,
                                                                                                           float):
        return line  # (without a start, two events with the same text are two events)
    try:
        return orjson.dumps([session, event.get("rtstream_id"), event["channel"], data.get("start"), data.get("end"),
                             data.get("text"), data.get("is_final")])
    except (TypeError, orjson.JSONEncodeError):  # (an integer past 64 bits): the line then
        return line


def is_dead_letter(event: dict[str, Any]) -> bool:
    """A dead-letter record (`ts`, `unix_ts`, `stage`, `reason`, then `event`, `raw` or `event_repr`), not an
    event: no channel, and no lifecycle name in `event` (there it is the refused event, an object)."""
    return "stage" in event and "reason" in event and "channel" not in event and not isinstance(
        event.get("event"), str)


def _dead_letter_file(name: str) -> bool:  # the pipeline's `dead-letter.jsonl`, `pipeline listen`'s `..._dead_letter`
    return "dead-letter" in name or "dead_letter" in name


def input_files(inputs: list[str]) -> list[Path]:
    """JSONL files named, or found under named directories (dead-letter files left out)."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*.jsonl")) if not _dead_letter_file(f.name) and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            from pipeline.errors import ConfigError

            what = "not a regular file" if p.exists() else "no such file or directory"  # a fifo, a device
            raise ConfigError(f"{raw}: {what} (expected JSONL files or a directory of them)")
    return files

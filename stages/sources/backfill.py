"""Backfill: after a re-bind, fetch over REST what VideoDB produced while no connection was bound.

VideoDB does not resend what it produced for a connection that dropped, but it
keeps the results: `RTStream.get_transcript(...)` and each scene index's
`get_scenes(...)` (visual and audio). Two halves:

- `Inlet` (source side, on the event loop): per rtstream and channel the latest
  event time seen and the keys `(data.start, text)` of the recent events, so a
  backfill knows where to resume and what is a duplicate. The source passes
  every batch through `Inlet.admit()` and yields `Inlet.take()` batches.
- `fetch()` (controller side, in a worker thread): pages through the SDK calls
  and turns records into ordinary events marked `"backfill": true`.

Record times are read as epoch milliseconds, the unit of the WebSocket events;
a value below 1e11 is taken as seconds and converted. Text comes from `text`
(or `description`, `transcript`). A response may be a list of records or an
object holding one under `segments`, `transcription`, `transcripts`,
`scene_index_records`, `scenes`, `records`, `results` or `data`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from pipeline.events import Event

log = logging.getLogger("pipeline.backfill")

#: Channels VideoDB keeps and we can fetch again; scene_index is visual_index by another name.
TRACKED: Final = frozenset({"transcript", "visual_index", "scene_index", "audio_index"})
KEEP_KEYS: Final = 4096  # recent event keys remembered per rtstream and channel (dedupe window)
MAX_CHANNELS: Final = 1024  # rtstream+channel pairs tracked; more are not deduplicated
PAGE_SIZE: Final = 100
MAX_PAGES: Final = 1000  # per rtstream and channel and backfill: bounds what one gap may pull
#: A fetch starts this much before the last start seen: results arrive in order of their end, and
#: a long segment (an audio-index batch) can start before a shorter one that arrived earlier.
MARGIN_MS: Final = 30_000
_LISTS: Final = ("segments", "transcription", "transcripts", "scene_index_records", "scenes", "records",
                 "results", "data")

Key = tuple[str, str]  # (rtstream_id, channel)
_NUMBER: Final = (int, float)


def _channel(ch: str) -> str:
    return "visual_index" if ch == "scene_index" else ch


class _Seen:
    __slots__ = ("keys", "last", "order")

    def __init__(self) -> None:
        self.last: int | None = None
        self.keys: dict[tuple[Any, Any], bool] = {}  # (start, text) -> arrived by backfill
        self.order: deque[tuple[Any, Any]] = deque()


class Inlet:
    """Where backfilled events enter a source: gap marks, dedupe, a queue of batches."""

    def __init__(self, wake: Callable[[], None] = lambda: None, backfilled: Counter[str] | None = None,
                 chunk: int = 1024) -> None:
        self.wake = wake  # the source's "something to yield" signal
        self.chunk = chunk  # most events per queued batch
        self.backfilled: Counter[str] = Counter() if backfilled is None else backfilled  # per channel, deduped
        self.duplicates = 0
        self._seen: dict[Key, _Seen] = {}
        self._marks: dict[Key, int | None] = {}
        self._queue: deque[list[Event]] = deque()

    # --- source side ----------------------------------------------------------------------------
    def admit(self, batch: list[Event]) -> list[Event]:
        """Remember what passes; drop a backfilled event seen before, or a live one backfilled before.

        Runs on every batch the source yields: one pass, no calls per event on the common path.
        """
        out = batch
        seen_by_key = self._seen
        for i, event in enumerate(batch):
            ch = event.get("channel")
            data = event.get("data")
            if ch not in TRACKED or type(data) is not dict:
                if out is not batch:
                    out.append(event)
                continue
            rid = event.get("rtstream_id")
            key = (rid if type(rid) is str else str(rid or ""), "visual_index" if ch == "scene_index" else ch)
            seen = seen_by_key.get(key)
            if seen is None:
                seen = self._new_channel(key)
            start: Any = data.get("start")
            k = (start, data.get("text"))
            hashable = True
            try:
                before = seen.keys.get(k)
            except TypeError:  # an unhashable start/text: not ours to dedupe
                before, hashable = None, False
            by_backfill = event.get("backfill") is True
            if before is not None and (by_backfill or before):
                self.duplicates += 1
                if out is batch:
                    out = batch[:i]
                continue
            if out is not batch:
                out.append(event)
            if before is None and hashable:
                seen.keys[k] = by_backfill
                seen.order.append(k)
                if len(seen.order) > KEEP_KEYS:
                    del seen.keys[seen.order.popleft()]
            if type(start) in _NUMBER and (seen.last is None or start > seen.last):
                seen.last = int(start)
            if by_backfill:
                self.backfilled[key[1]] += 1
        return out

    def _new_channel(self, key: Key) -> _Seen:
        seen = _Seen()
        if len(self._seen) < MAX_CHANNELS:  # beyond: tracked for this batch only, then forgotten
            self._seen[key] = seen
        return seen

    def mark_gap(self, pending: Iterable[Event] = ()) -> None:
        """The connection dropped: remember, per channel, the last event time before the gap.

        `pending`: events received but not yet yielded (they precede the gap too).
        A mark stays until a backfill has covered it; a second drop keeps the first mark.
        """
        last = {k: s.last for k, s in self._seen.items()}
        for event in pending:
            ch = event.get("channel")
            data = event.get("data")
            if ch in TRACKED and isinstance(data, dict) and isinstance(data.get("start"), int | float):
                k = (str(event.get("rtstream_id") or ""), _channel(ch))
                prev = last.get(k)
                last[k] = int(data["start"]) if prev is None else max(prev, int(data["start"]))
        for k, t in last.items():
            self._marks.setdefault(k, t)

    def take(self) -> list[Event] | None:
        """The next backfilled batch to yield, or None."""
        return self._queue.popleft() if self._queue else None

    # --- controller side ------------------------------------------------------------------------
    def since(self, rtstream_id: str, channel: str) -> int | None:
        """Where a backfill of this rtstream and channel starts (None: from the beginning)."""
        key = (rtstream_id, _channel(channel))
        if key in self._marks:
            return self._marks[key]
        seen = self._seen.get(key)
        return seen.last if seen is not None else None

    def covered(self, rtstream_id: str, channel: str, since: int | None) -> None:
        """A backfill from `since` succeeded: drop the mark unless a later drop replaced it."""
        key = (rtstream_id, _channel(channel))
        if key in self._marks and self._marks[key] == since:
            del self._marks[key]

    def inject(self, events: list[Event]) -> None:
        """Queue backfilled events (sorted by event time) as one batch for the source to yield."""
        if events:
            events.sort(key=lambda e: e["data"]["start"])
            self._queue.extend(events[i:i + self.chunk] for i in range(0, len(events), self.chunk))
            self.wake()

    def checkpoint(self) -> dict[str, int]:
        """Where a backfill would start now, per "rtstream_id channel" (saved for a restart)."""
        out = {f"{k[0]} {k[1]}": s.last for k, s in self._seen.items() if s.last is not None}
        out.update({f"{k[0]} {k[1]}": t for k, t in self._marks.items() if t is not None})
        return out

    def resume(self, saved: Any) -> None:
        """After a restart: backfill from a checkpoint the previous process saved (bad entries ignored)."""
        for name, t in (saved.items() if isinstance(saved, dict) else ()):
            rid, _, ch = str(name).rpartition(" ")
            if rid and ch in TRACKED and type(t) in _NUMBER:
                self._marks.setdefault((rid, _channel(ch)), int(t))

    def known(self, event: Event) -> bool:
        """True when an event with this rtstream, channel, start and text was already let through."""
        seen = self._seen.get((str(event.get("rtstream_id") or ""), _channel(event["channel"])))
        data = event["data"]
        return seen is not None and (data.get("start"), data.get("text")) in seen.keys

    @property
    def queued(self) -> bool:
        return bool(self._queue)


# --- fetching (worker thread) ------------------------------------------------------------------

@dataclass
class Target:
    """One rtstream and channel to backfill, and the SDK object that reads it."""

    rtstream_id: str
    rtstream_name: str
    channel: str  # transcript | visual_index | audio_index
    source: Any  # RTStream (transcript) or RTStreamSceneIndex (indexes)

    @property
    def key(self) -> Key:
        return (self.rtstream_id, self.channel)


def to_ms(value: Any) -> int | None:
    """A record time as epoch ms (seconds below 1e11 are converted); None if not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return int(value * 1000) if abs(value) < 1e11 else int(value)


def _records(resp: Any) -> tuple[list[Any], bool | None]:
    """(records, next_page or None when the response does not say) from any tolerated shape."""
    if isinstance(resp, list):
        return resp, None
    if not isinstance(resp, dict):
        return [], False
    nxt = resp.get("next_page")
    more = bool(nxt) if nxt is not None else None
    for name in _LISTS:
        items = resp.get(name)
        if isinstance(items, list):
            return items, more
        if isinstance(items, dict):  # e.g. {"data": {"segments": [...]}}
            return _records(items)
    return [], False


def _event(t: Target, rec: Any) -> Event | None:
    if not isinstance(rec, dict):
        return None
    start = to_ms(rec.get("start"))
    text = rec.get("text", rec.get("description", rec.get("transcript")))
    if start is None or not isinstance(text, str):
        return None
    data: dict[str, Any] = {"text": text, "start": start}
    end = to_ms(rec.get("end"))
    if end is not None:
        data["end"] = end
    if t.channel == "transcript":
        data["is_final"] = rec.get("is_final", True) is not False
    return {"channel": t.channel, "rtstream_id": t.rtstream_id, "rtstream_name": t.rtstream_name,
            "data": data, "backfill": True}


def _page(t: Target, page: int, since: int | None) -> Any:
    if t.channel == "transcript":
        return t.source.get_transcript(page=page, page_size=PAGE_SIZE, start=since)
    if since is None:
        return t.source.get_scenes(page=page, page_size=PAGE_SIZE)
    # get_scenes sends start/end only together; end = now, in the unit `since` is in
    now = time.time() + 3600
    end = int(now * 1000) if since >= 1e11 else int(now)
    return t.source.get_scenes(start=since, end=end, page=page, page_size=PAGE_SIZE)


def fetch(t: Target, since: int | None) -> list[Event]:
    """Everything VideoDB holds for `t` from `since` (inclusive), as backfill events. Blocking."""
    if since is not None:
        since -= MARGIN_MS  # what it re-reads that arrived live is dropped as a duplicate
    out: list[Event] = []
    for page in range(1, MAX_PAGES + 1):
        items, more = _records(_page(t, page, since))
        for rec in items:
            ev = _event(t, rec)
            if ev is not None and (since is None or ev["data"]["start"] >= since):
                out.append(ev)
        if not (more if more is not None else len(items) >= PAGE_SIZE):
            return out
    log.warning("backfill %s %s: stopped after %d pages", t.rtstream_name, t.channel, MAX_PAGES)
    return out


async def run(targets: list[Target], inlet: Inlet, who: str,
              api_key: str | None) -> tuple[Counter[str], bool]:
    """Fetch every target from where its channel left off, queue the new events; (queued per channel, all ok).

    Each SDK page runs in a worker thread. A target that fails keeps its gap mark, so
    the next re-bind tries again from the same point.
    """
    from pipeline.videodb_sdk import VideoDBCallError, call

    by_key: dict[Key, list[Target]] = {}
    for t in targets:
        by_key.setdefault(t.key, []).append(t)
    events: list[Event] = []
    ok = True
    for (rid, channel), group in by_key.items():
        since = inlet.since(rid, channel)
        got: list[Event] = []
        try:
            for t in group:
                got += await call(who, f"backfill {t.rtstream_name} {channel}", fetch, t, since, api_key=api_key)
        except VideoDBCallError as exc:
            ok = False
            log.warning("%s (kept for the next re-bind)", exc)
            continue
        inlet.covered(rid, channel, since)
        events += got
    fresh = [e for e in events if not inlet.known(e)]
    inlet.inject(fresh)
    return Counter(e["channel"] for e in fresh), ok


async def after_rebind(pipelines: Any, inlet: Inlet, who: str, api_key: str | None) -> Counter[str]:
    """Backfill every AI pipeline of `pipelines` (an AIPipelines) once it is bound; log and return per channel."""
    if pipelines.bound_to is None:
        return Counter()
    t0 = time.monotonic()
    got, ok = await run(pipelines.backfill_targets(), inlet, who, api_key)
    if ok:
        pipelines.retired.clear()  # their gap is covered
    per = ", ".join(f"{ch} {n}" for ch, n in sorted(got.items())) or "nothing missing"
    log.info("%s: backfill after re-bind to %s: %s (%.2fs)", who, pipelines.bound_to, per, time.monotonic() - t0)
    return got

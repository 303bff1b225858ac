"""Backfill: after a re-bind, fetch over REST what VideoDB produced while no connection was bound.

VideoDB does not resend what it produced for a connection that dropped, but it
keeps the results: `RTStream.get_transcript(...)` and each scene index's
`get_scenes(...)` (visual and audio). `fetch()` pages through those calls in a
worker thread and turns records into ordinary events marked `"backfill": true`;
`run()` queues them on the source's `Inlet` (inlet.py), which deduplicates them
against what arrived live.

Record times are read as epoch milliseconds, the unit of the WebSocket events;
a value below 1e11 is taken as seconds and converted. The unit of the REST time
filters is not documented: a filtered query is sent in epoch milliseconds, and
one that finds no record at all is asked again in epoch seconds (with an `end`,
so a server that reads milliseconds answers that one with nothing as well). Text comes from `text`
(or `description`, `transcript`). A response may be a list of records or an
object holding one under `segments`, `transcription`, `transcripts`,
`scene_index_records`, `scenes`, `records`, `results` or `data`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from pipeline.events import Event
from stages.sources.inlet import Inlet, Key

__all__ = ["Inlet", "Target", "after_rebind", "fetch", "run"]

log = logging.getLogger("pipeline.backfill")

PAGE_SIZE: Final = 100
MAX_PAGES: Final = 1000  # per rtstream and channel and backfill: bounds what one gap may pull
MAX_TEXT: Final = 1 << 20  # a longer record text is skipped (the WebSocket sources' frame limit)
MAX_BYTES: Final = 64 << 20  # text bytes one target may pull in one backfill
#: A fetch starts this much before the last start seen: results arrive in order of their end, and
#: a long segment (an audio-index batch) can start before a shorter one that arrived earlier.
MARGIN_MS: Final = 30_000
END_AHEAD_MS: Final = 24 * 3_600_000  # a time-filtered query ends this far past max(now, the mark)
_LISTS: Final = ("segments", "transcription", "transcripts", "scene_index_records", "scenes", "records",
                 "results", "data")


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


def _page(t: Target, page: int, since: int | None, per: int) -> Any:
    """One page of `t` from `since` (epoch ms), the filters sent in ms (`per` 1) or seconds (`per` 1000)."""
    if since is None:
        if t.channel == "transcript":
            return t.source.get_transcript(page=page, page_size=PAGE_SIZE)
        return t.source.get_scenes(page=page, page_size=PAGE_SIZE)
    start = since // per
    if t.channel == "transcript" and per == 1:
        return t.source.get_transcript(page=page, page_size=PAGE_SIZE, start=start)
    # get_scenes sends start/end only together. The end is past both our clock and the mark (VideoDB's
    # time): with our clock hours behind VideoDB's, "an hour from now" ended before the gap began.
    end = (max(int(time.time() * 1000), since) + END_AHEAD_MS) // per
    if t.channel == "transcript":
        return t.source.get_transcript(page=page, page_size=PAGE_SIZE, start=start, end=end)
    return t.source.get_scenes(start=start, end=end, page=page, page_size=PAGE_SIZE)


def fetch(t: Target, since: int | None) -> list[Event]:
    """Everything VideoDB holds for `t` from `since` (inclusive), as backfill events. Blocking."""
    if since is not None:  # in ms (live times in seconds too); re-read a margin, dropped later as duplicates
        since = (to_ms(since) or since) - MARGIN_MS
    out, found = _fetch(t, since, 1)
    if since is not None and not found:  # nothing at all in ms: perhaps the filters read epoch seconds
        out, _ = _fetch(t, since, 1000)
    return out


def _fetch(t: Target, since: int | None, per: int) -> tuple[list[Event], bool]:
    """(events of `t` from `since`, whether the server returned any record at all), paging until the end."""
    out: list[Event] = []
    size = skipped = 0
    found = False
    for page in range(1, MAX_PAGES + 1):
        items, more = _records(_page(t, page, since, per))
        found = found or bool(items)
        for rec in items:
            ev = _event(t, rec)
            if ev is None or (since is not None and ev["data"]["start"] < since):
                continue
            n = len(ev["data"]["text"])
            if n > MAX_TEXT:
                skipped += 1
                continue
            size += n
            out.append(ev)
        if skipped:
            log.warning("backfill %s %s: skipped %d records with text over %d characters",
                        t.rtstream_name, t.channel, skipped, MAX_TEXT)
            skipped = 0
        if size > MAX_BYTES:
            log.warning("backfill %s %s: stopped after %d MiB of text", t.rtstream_name, t.channel, size >> 20)
            return out, found
        if not (more if more is not None else len(items) >= PAGE_SIZE):
            return out, found
    log.warning("backfill %s %s: stopped after %d pages", t.rtstream_name, t.channel, MAX_PAGES)
    return out, found


class Fetched(NamedTuple):
    """What one backfill did."""

    got: Counter[str]  # events queued, per channel
    ok: bool  # every target read
    soon: bool  # a failure is worth another try soon (5xx, 429, network)
    wait: float  # the longest Retry-After VideoDB gave a failed read (0: none)


async def run(targets: list[Target], inlet: Inlet, who: str, api_key: str | None,
              session_id: str | None = None) -> Fetched:
    """Fetch every target from where its channel left off, queue the new events.
    `session_id`: set as their `capture_session_id` (a session that has ended is no longer looked up by rtstream).

    Each SDK page runs in a worker thread. A target that fails keeps its gap mark, so
    the next re-bind tries again from the same point; one worth another try soon (5xx, 429, network) is tried
    again every status_poll_interval, one VideoDB refused (4xx) is not.
    """
    from pipeline.videodb_sdk import VideoDBCallError, call

    by_key: dict[Key, list[Target]] = {}
    for t in targets:
        by_key.setdefault(t.key, []).append(t)
    events: list[Event] = []
    ok, soon, wait = True, False, 0.0
    for (rid, channel), group in by_key.items():
        since = inlet.since(rid, channel)
        got: list[Event] = []
        try:
            for t in group:
                got += await call(who, f"backfill {t.rtstream_name} {channel}", fetch, t, since, api_key=api_key)
        except VideoDBCallError as exc:
            ok, soon = False, soon or not exc.fatal  # a refused read (4xx) waits for the next re-bind
            wait = max(wait, exc.retry_after or 0.0)
            log.warning("%s (kept for the next re-bind)", exc)
            continue
        inlet.covered(rid, channel, since)
        events += got
    fresh = [e for e in events if not inlet.known(e)]
    if session_id is not None:
        for e in fresh:
            e["capture_session_id"] = session_id
    inlet.inject(fresh)
    return Fetched(Counter(e["channel"] for e in fresh), ok, soon, wait)


async def after_rebind(pipelines: Any, inlet: Inlet, who: str, api_key: str | None) -> Counter[str]:
    """Backfill every AI pipeline of `pipelines` (an AIPipelines) once it is bound; log and return per channel."""
    if pipelines.bound_to is None:
        return Counter()
    t0 = time.monotonic()
    got, ok, soon, wait = await run(pipelines.backfill_targets(), inlet, who, api_key)
    pipelines.asked_to_wait(wait)
    pipelines.backfill_due = soon  # a failed target keeps its gap mark for the next try (soon, or the next re-bind)
    if ok:
        pipelines.retired.clear()  # their gap is covered
    per = ", ".join(f"{ch} {n}" for ch, n in sorted(got.items())) or "nothing missing"
    log.info("%s: backfill after re-bind to %s: %s (%.2fs)", who, pipelines.bound_to, per, time.monotonic() - t0)
    return got

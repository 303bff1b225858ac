"""Where backfilled events enter a source: gap marks, dedupe, a queue of batches.

Per rtstream and channel it keeps the latest event time seen and the keys
`(data.start, text)` of the recent events, so a backfill knows where to resume
and what is a duplicate. Keys are bounded per channel (`KEEP_KEYS`, `KEEP_MS`)
and in all (`MAX_KEYS`): past that, the keys of the channels that went longest
without a new event are forgotten first (their gap marks stay). The source passes every batch it yields through
`Inlet.admit()` and yields the `Inlet.take()` batches the controller queued.

While a re-bind and its backfill are under way (`hold()` ... `release()`), the
source holds back the events the new connection delivers, so the backfilled
batch comes first and event-time order holds across the gap (rules, windows
and cooldowns see events in order). A hold lasts at most `HOLD_MAX` seconds.
"""

from __future__ import annotations

import math
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from pipeline.events import Event

#: Channels VideoDB keeps and we can fetch again; scene_index is visual_index by another name.
TRACKED: Final = frozenset({"transcript", "visual_index", "scene_index", "audio_index"})
KEEP_KEYS: Final = 4096  # recent event keys remembered per rtstream and channel (dedupe window)
KEEP_MS: Final = 30_000  # ... and only those less than this much event time behind the newest one
MAX_CHANNELS: Final = 100_000  # rtstream+channel pairs tracked (4 per capture session); more are not deduplicated
#: keys kept in all channels together (~30 MB); past it, the least recently active channels' keys go first,
#: down to KEYS_AFTER_EVICTION, so the sort that picks them runs once per many thousand new keys
MAX_KEYS: Final = 1 << 18
KEYS_AFTER_EVICTION: Final = MAX_KEYS * 3 // 4
HOLD_MAX: Final = 10.0  # seconds live events may wait for a backfill before they go on anyway

Key = tuple[str, str]  # (rtstream_id, channel)
_NUMBER: Final = (int, float)
_ENTRY: Final = struct.Struct("=qd")  # a key's hash and its data.start (NaN: not a number)
_SIZE: Final = _ENTRY.size


def _channel(ch: str) -> str:
    return "visual_index" if ch == "scene_index" else ch


class _Seen:
    """One channel's keys in arrival order, packed in a bytearray (key hash, start) from `head` on: the
    garbage collector neither tracks nor walks it (4 channels a capture session, many thousand sessions)."""

    __slots__ = ("head", "keys", "last", "order", "used")

    def __init__(self) -> None:
        self.last: int | None = None
        self.used = 0  # the admit() call that last added a key (which channels went quiet longest)
        # hash((start, text)) -> arrived by backfill; a hash, so no event text is kept alive (many sessions)
        self.keys: dict[int, bool] = {}
        self.order = bytearray()  # _ENTRY per key, oldest first; start NaN when not a number
        self.head = 0  # where the oldest key still kept starts in `order`

    def __len__(self) -> int:
        """Keys in `order` (as many as in `keys`)."""
        return (len(self.order) - self.head) // _SIZE

    def clear(self) -> None:
        self.keys.clear()
        self.order, self.head = bytearray(), 0


class Inlet:
    """Where backfilled events enter a source: gap marks, dedupe, a queue of batches."""

    def __init__(self, wake: Callable[[], None] = lambda: None, backfilled: Counter[str] | None = None,
                 chunk: int = 1024, position: Callable[[], int] = lambda: 0) -> None:
        self.wake = wake  # the source's "something to yield" signal
        self.chunk = chunk  # most events per queued batch
        self.position = position  # how many events the source has accepted so far
        self.hold_from: int | None = None  # position at hold(): later live events wait for the backfill
        self.held_at = 0.0
        self._holds = 0
        self.backfilled: Counter[str] = Counter() if backfilled is None else backfilled  # per channel, deduped
        self.duplicates = 0
        self._seen: dict[Key, _Seen] = {}
        self.keys_held = 0  # keys in all of `_seen` together (at most MAX_KEYS after every admit())
        self._calls = 0
        self._passing: list[_Seen] = []  # channels past MAX_CHANNELS, tracked for one batch only
        self._marks: dict[Key, int | None] = {}
        self._queue: deque[list[Event]] = deque()

    # --- source side ----------------------------------------------------------------------------
    def admit(self, batch: list[Event]) -> list[Event]:
        """Remember what passes; drop a backfilled event seen before, or a live one backfilled before.

        Runs on every batch the source yields: one pass, no calls per event on the common path.
        """
        out = batch
        seen_by_key = self._seen
        self._calls += 1
        call = self._calls
        held = self.keys_held
        pack, unpack = _ENTRY.pack, _ENTRY.unpack_from
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
            hashable = True
            try:
                k = hash((start, data.get("text")))
                before = seen.keys.get(k)
            except TypeError:  # an unhashable start/text: not ours to dedupe
                k, before, hashable = 0, None, False
            by_backfill = event.get("backfill") is True
            if before is not None and (by_backfill or before):
                self.duplicates += 1
                if out is batch:
                    out = batch[:i]
                continue
            if out is not batch:
                out.append(event)
            if before is None and hashable:
                at = math.nan  # start as a float (event times are well within its exact range), NaN if not a number
                if type(start) in _NUMBER:
                    try:
                        at = float(start)
                    except OverflowError:
                        pass
                keys, order, head = seen.keys, seen.order, seen.head
                keys[k] = by_backfill
                order += pack(k, at)
                seen.used = call
                held += 1
                if len(keys) > KEEP_KEYS:
                    del keys[unpack(order, head)[0]]
                    head += _SIZE
                    held -= 1
                if at == at:  # a number: a backfill overlaps live events by seconds, older keys go
                    cutoff = at - KEEP_MS
                    old, old_start = unpack(order, head)
                    while old_start < cutoff:  # a NaN start (not a number) compares False: stops there
                        del keys[old]
                        head += _SIZE
                        held -= 1
                        old, old_start = unpack(order, head)
                if head != seen.head:  # keys dropped: compact the buffer once half of it is gone
                    if head >= 1024 and 2 * head >= len(order):
                        del order[:head]
                        head = 0
                    seen.head = head
            if type(start) in _NUMBER and (seen.last is None or start > seen.last):
                seen.last = int(start)
            if by_backfill:
                self.backfilled[key[1]] += 1
        if self._passing:  # their keys are forgotten with them
            held -= sum(len(s.keys) for s in self._passing)
            self._passing.clear()
        self.keys_held = held
        if held > MAX_KEYS:
            self._evict()
        return out

    def _new_channel(self, key: Key) -> _Seen:
        seen = _Seen()
        if len(self._seen) < MAX_CHANNELS:
            self._seen[key] = seen
        else:  # tracked for this batch only, then forgotten
            self._passing.append(seen)
        return seen

    def _evict(self) -> None:
        """Over MAX_KEYS in all: forget the keys of the channels that went longest without a new event, down to
        KEYS_AFTER_EVICTION. A flood of rtstream ids then costs the quiet channels their dedupe window, never
        unbounded memory; a busy channel (any in this batch) keeps its keys, and every channel its gap mark."""
        for seen in sorted(self._seen.values(), key=lambda s: s.used):
            if self.keys_held <= KEYS_AFTER_EVICTION:
                return
            if seen.keys:
                self.keys_held -= len(seen.keys)
                seen.clear()

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

    def hold(self) -> None:
        """A re-bind and backfill start: hold back what the source accepts from now on."""
        if self._holds == 0:
            self.hold_from, self.held_at = self.position(), time.monotonic()
        self._holds += 1

    def release(self) -> None:
        """A re-bind and backfill ended (queued or failed): let held live events go once none is left."""
        self._holds = max(0, self._holds - 1)
        if self._holds == 0 and self.hold_from is not None:
            self.hold_from = None
            self.wake()

    def releasable(self, pending: int) -> int:
        """How many of the `pending` (oldest first) live events may be yielded now."""
        if self.hold_from is None:
            return pending
        if time.monotonic() - self.held_at > HOLD_MAX:
            self._holds = 0
            self.hold_from = None
            return pending
        return max(0, pending - (self.position() - self.hold_from))

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
            if rid and ch in TRACKED and type(t) in _NUMBER and len(self._marks) < MAX_CHANNELS:
                self._marks.setdefault((rid, _channel(ch)), int(t))

    def known(self, event: Event) -> bool:
        """True when an event with this rtstream, channel, start and text was already let through."""
        seen = self._seen.get((str(event.get("rtstream_id") or ""), _channel(event["channel"])))
        data = event["data"]
        try:
            return seen is not None and hash((data.get("start"), data.get("text"))) in seen.keys
        except TypeError:
            return False

    def forget(self, rtstream_ids: Iterable[str]) -> None:
        """A capture session ended: drop what is kept for its rtstreams (nothing more will arrive)."""
        ids = set(rtstream_ids)
        for key in [k for k in self._seen if k[0] in ids]:
            self.keys_held -= len(self._seen.pop(key).keys)
        for key in [k for k in self._marks if k[0] in ids]:
            del self._marks[key]

    @property
    def queued(self) -> bool:
        return bool(self._queue)

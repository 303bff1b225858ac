"""What sits between the ingest task and one sink: a bounded memory queue or a disk spool.

Both are bounded in batches and in bytes. `memory` makes ingest wait when full
(or dead-letters the new batch with `when_full: dead_letter`); `disk` appends
every batch to a spool under state_dir and keeps the newest few in memory, so
a sink that falls behind never slows the source until `max_bytes` is spooled.
A batch leaves a buffer only once the sink's `write()` returned (`taken`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.api import BufferOptions
from pipeline.errors import StageError
from pipeline.events import Batch
from pipeline.state.spool import Damage, Record, Spool

Reject = Callable[[Batch, str], "int | None"]
"""Dead-letters events the buffer could not hold, with the reason; may return how many reached the file."""
ReportDamage = Callable[[Damage], None]

#: A batch read back from a spool may be merged with the ones after it up to these bounds.
MERGE_RECORDS = 64
MERGE_BYTES = 1 << 20
#: Default for the newest batches a disk buffer keeps decoded in memory (saves reading them back).
DISK_CACHE_BYTES = 32 << 20
_FALLBACK_EVENT_BYTES = 1024


@dataclass(slots=True)
class Item:
    """A batch on its way to a sink: source batch index (-1 if from an earlier run), size, spool end."""

    index: int
    batch: Batch
    nbytes: int
    end: int = 0


def estimate_bytes(batch: Batch) -> int:
    """Encoded size of a batch, for sources that do not report the raw size of what they read."""
    try:
        return len(orjson.dumps(batch, default=str))
    except (TypeError, orjson.JSONEncodeError):
        return _FALLBACK_EVENT_BYTES * len(batch)


class _Buffer:
    """What both buffers share: the bounds, the shutdown flags, and the events that wake put/get."""

    def __init__(self, opts: BufferOptions, max_batches: int, reject: Reject) -> None:
        self.max_batches = max_batches
        self.max_bytes = opts.limit
        self.when_full = opts.when_full
        self._reject = reject
        self._room = asyncio.Event()
        self._ready = asyncio.Event()
        self._finished = False
        self.expired = False  # shutdown deadline passed: put never waits
        self.safe_upto = -1  # highest source batch index written or dead-lettered, in order
        self.rejected = 0  # events of batches that did not fit (`when_full: dead_letter`), dead-lettered
        self.dropped_at_shutdown = 0  # events of batches that came after drain_timeout (dead-lettered)

    def _drop(self, index: int, batch: Batch, why: str) -> None:
        """Dead-letter a batch the buffer will not hold; it counts as done, in order."""
        got = self._reject(batch, why)
        if self.expired:  # not for being full (`when_full: block` drops nothing): for coming too late
            self.dropped_at_shutdown += len(batch)
        else:
            self.rejected += len(batch) if got is None else got
        self.skip(index)

    def skip(self, index: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """No more batches will be put."""
        self._finished = True
        self._ready.set()

    def expire(self) -> None:
        self.expired = True
        self._room.set()


class MemoryBuffer(_Buffer):
    """A FIFO of batches bounded by count and bytes; counted until the sink's write returns."""

    durable = False

    def __init__(self, opts: BufferOptions, max_batches: int, reject: Reject, *, merge: bool = False) -> None:
        super().__init__(opts, max_batches, reject)
        #: hand the sink every queued batch at once (bounded): for a sink whose write() waits for a round
        #: trip (the faust ingest's Kafka sink), queued batches then wait for one round trip, not one each
        self.merge = merge
        self._q: deque[Item] = deque()
        self.bytes = 0  # queued + being written
        self._inflight = 0
        self._skipped = -1

    @property
    def pending_events(self) -> int:
        return sum(len(i.batch) for i in self._q)

    def _full(self, nbytes: int) -> bool:
        return bool(self._q) and (len(self._q) >= self.max_batches or self.bytes + nbytes > self.max_bytes)

    async def put(self, index: int, batch: Batch, nbytes: int) -> None:
        while self._full(nbytes):
            if self.expired or self.when_full == "dead_letter":
                why = ("not accepted before drain_timeout at shutdown" if self.expired else
                       f"sink buffer full ({len(self._q)} batches, {self.bytes} bytes; when_full: dead_letter)")
                self._drop(index, batch, why)
                return
            self._room.clear()
            await self._room.wait()
        self._q.append(Item(index, batch, nbytes))
        self.bytes += nbytes
        self._ready.set()

    def skip(self, index: int) -> None:
        """Batch `index` has nothing for this sink: it counts as written once everything before it is."""
        self._skipped = index
        if not self._q and not self._inflight:
            self.safe_upto = index

    async def get(self) -> Item | None:
        while not self._q:
            if self._finished:
                return None
            self._ready.clear()
            await self._ready.wait()
        self._inflight += 1
        item = self._q.popleft()
        if not self.merge or not self._q:
            return item
        events, nbytes, n = list(item.batch), item.nbytes, 1
        while self._q and n < MERGE_RECORDS and nbytes + self._q[0].nbytes <= MERGE_BYTES:
            nxt = self._q.popleft()
            events.extend(nxt.batch)
            nbytes += nxt.nbytes
            n += 1
            item = nxt
        return Item(item.index, events, nbytes)  # the last index: taken() marks all of them written

    def taken(self, item: Item) -> None:
        """The sink's write returned (or it dead-lettered the batch itself)."""
        self._inflight -= 1
        self.bytes -= item.nbytes
        self.safe_upto = max(self.safe_upto, item.index)
        if not self._q and not self._inflight and self._skipped > self.safe_upto:
            self.safe_upto = self._skipped
        self._room.set()

    def leftover(self) -> list[Item]:
        """Batches never handed to the sink (dead-lettered by the runtime at shutdown)."""
        out = list(self._q)
        self._q.clear()
        return out

    def close(self) -> None:
        pass


class DiskBuffer(_Buffer):
    """Every batch is appended to a spool; the newest stay decoded in memory; a restart drains the spool."""

    durable = True

    def __init__(self, opts: BufferOptions, directory: Path, max_batches: int, reject: Reject,
                 damaged: ReportDamage, *, segment_bytes: int = 64 << 20,
                 cache_bytes: int = DISK_CACHE_BYTES) -> None:
        super().__init__(opts, max_batches, reject)
        self.cache_bytes_max = min(cache_bytes, self.max_bytes)
        self.spool = Spool(directory, segment_bytes=segment_bytes)
        self._damaged = damaged
        self._cache: deque[Item] = deque()
        self._cache_bytes = 0
        self._live = True  # the cache holds every record from the read position on
        self.restored = 0  # events found in the spool at start (from an earlier run)
        self.unencodable = 0  # events dead-lettered because JSON cannot hold them (not a full buffer)
        self.lost = 0  # undelivered events whose spool was removed or replaced while running
        self.lost_why: str | None = None

    def open(self) -> None:
        """Recover the spool: report a torn tail, queue what an earlier run left undelivered."""
        for d in self.spool.open():
            self._damaged(d)
        self.restored = self.spool.pending_events
        self._live = self.spool.pending_bytes == 0

    @property
    def pending_events(self) -> int:
        return self.spool.pending_events

    @property
    def spooled_bytes(self) -> int:
        return self.spool.pending_bytes

    async def put(self, index: int, batch: Batch, nbytes: int) -> None:
        try:
            payload = orjson.dumps(batch, default=str)
        except (TypeError, orjson.JSONEncodeError):
            batch, payload = self._encodable(batch)
        spool = self.spool
        while spool.pending_bytes and spool.pending_bytes + len(payload) > self.max_bytes:
            if self.expired or self.when_full == "dead_letter":
                self._drop(index, batch, "not spooled before drain_timeout at shutdown" if self.expired else
                           f"sink spool full ({spool.pending_bytes} bytes, max_bytes {self.max_bytes}; "
                           "when_full: dead_letter)")
                return
            self._room.clear()
            await self._room.wait()
        if not batch:
            self.safe_upto = index
            return
        try:
            end = spool.append(payload, len(batch))
        except StageError as exc:  # the disk refused the record: dead-letter it, then the runtime stops
            self._reject(batch, f"cannot spool: {exc}")  # counted as the sink's `failed` in the summary
            self.skip(index)
            raise
        self.safe_upto = index
        if self._live and len(self._cache) < self.max_batches and \
                self._cache_bytes + nbytes <= self.cache_bytes_max:
            self._cache.append(Item(index, batch, nbytes, end))
            self._cache_bytes += nbytes
        else:
            self._live = False
        self._ready.set()

    def skip(self, index: int) -> None:
        self.safe_upto = index

    def _encodable(self, batch: Batch) -> tuple[Batch, bytes]:
        """Dead-letter the events orjson cannot encode (one by one); keep the rest."""
        keep: Batch = []
        for ev in batch:
            try:
                orjson.dumps(ev, default=str)
            except (TypeError, orjson.JSONEncodeError) as exc:
                self._reject([ev], f"cannot spool: event is not JSON-encodable: {exc}")
                self.unencodable += 1
            else:
                keep.append(ev)
        return keep, orjson.dumps(keep, default=str)

    async def get(self) -> Item | None:
        while True:
            if self._cache:
                cached = self._cache.popleft()
                self._cache_bytes -= cached.nbytes
                self.spool.skip_to(cached.end, len(cached.batch))
                return cached
            item = self._read()
            if item is not None:
                return item
            self._live = True  # caught up with the disk: new batches can be served from memory again
            if self._finished:
                return None
            self._ready.clear()
            await self._ready.wait()

    def _read(self) -> Item | None:
        """The next records on disk, decoded and merged into one batch (bounded)."""
        events: Batch = []
        end = size = n = 0
        while n < MERGE_RECORDS and size < MERGE_BYTES:
            rec: Record | Damage | None = self.spool.read()
            if rec is None:
                break
            if isinstance(rec, Damage):
                self._damaged(rec)
                continue
            n += 1
            end, size = rec.end, size + len(rec.payload)
            try:
                got: Any = orjson.loads(rec.payload)
            except orjson.JSONDecodeError:
                got = None
            if not isinstance(got, list):
                self._damaged(Damage(self.spool.dir, 0, len(rec.payload), "record is not a JSON array",
                                     rec.payload[:4096]))
                continue
            events.extend(got)
        if not n:
            return None
        return Item(-1, events, size, end)

    def taken(self, item: Item) -> None:
        self.spool.ack(item.end)
        self._room.set()

    def leftover(self) -> list[Item]:
        """Nothing is dead-lettered at shutdown: undelivered batches stay in the spool for the next run."""
        self._cache.clear()
        return []

    def check_kept(self) -> str | None:
        """At the end of a run: why what is left undelivered will not reach the next run (its spool was removed
        or replaced), counting it as `lost`; None when the spool still holds it."""
        if self.lost_why is None and (why := self.spool.gone()) is not None:
            self.lost, self.lost_why = self.spool.pending_events, why
        return self.lost_why

    def close(self) -> None:
        self.spool.close()


SinkBuffer = MemoryBuffer | DiskBuffer


def spool_root(cfg: Any) -> Path:
    """Where disk buffers live: `<state_dir>/spool` (state_dir defaults to out/<name>)."""
    state_dir = getattr(cfg, "state_dir", None) or cfg.out_dir
    return Path(state_dir) / "spool"


def spool_dir(cfg: Any, index: int, type_name: str) -> Path:
    """One directory per sink, named by its position and type (`sinks-2-kafka`)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in type_name)[:60]
    return spool_root(cfg) / f"sinks-{index}-{safe}"

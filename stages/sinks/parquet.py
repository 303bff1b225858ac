"""Sink `parquet`: events as Parquet files with one fixed schema, for warehouses and DuckDB.

`path` is a directory template (`{channel}`, `{date}`); each directory gets
files `part-<UTC time>-<pid>-<run>-<n>.parquet`, written under a hidden temporary
name and renamed only once complete, so a reader never sees half a file.
Files roll at `roll_bytes` or `roll_interval`. pyarrow is imported only when
the sink starts (the optional `[parquet]` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import math
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson
from pydantic import Field, field_validator

from pipeline.api import Batch, Context, Event, Sink, SinkOptions
from pipeline.errors import PipelineError, SinkFailed, StageError
from pipeline.events import channel, event_time_ms
from pipeline.files import ensure_private_dir, open_private
from pipeline.stale import PARQUET_TMP, remove_stale
from pipeline.types import Duration
from stages.sinks.channel_dirs import ChannelNames
from stages.sinks.dates import UtcDays

MAX_OPEN_DIRS: Final = 32
MAX_SWEPT: Final = 4096  # directories remembered as cleaned of leftovers ({date}/{channel} paths keep coming)
#: file numbers, one sequence for the whole process: each sink counting from 1 gave a sink re-created by a reload
#: (or two sinks writing one directory) its predecessor's file name within the same second, and the rename of its
#: completed file replaced the other's
_SEQ = itertools.count(1)
#: the pid alone does not tell processes apart: workers in containers sharing a volume are often all pid 1, and
#: wrote (truncated, replaced) each other's files
_RUN: Final = secrets.token_hex(4)
MAX_WAITING_BYTES: Final = 32 << 20  # rows waiting for a row group, all directories together (JSON size)
# rows in the open files, kept (as JSON) to be dead-lettered should a file fail before it is complete; past this
# (all directories together) the open files are completed
MAX_KEPT_BYTES: Final = 32 << 20
COLUMNS: Final = ("channel", "rtstream_id", "rtstream_name", "capture_session_id", "ts", "unix_ts", "start", "end",
                  "text", "is_final", "event_label", "severity", "matched", "raw")


def schema() -> Any:
    """The fixed schema (documented in README); every file has exactly these columns."""
    import pyarrow as pa

    return pa.schema([
        ("channel", pa.string()), ("rtstream_id", pa.string()), ("rtstream_name", pa.string()),
        ("capture_session_id", pa.string()), ("ts", pa.timestamp("ms", tz="UTC")), ("unix_ts", pa.float64()),
        ("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()), ("is_final", pa.bool_()),
        ("event_label", pa.string()), ("severity", pa.string()), ("matched", pa.list_(pa.string())),
        ("raw", pa.string()),
    ])


class ParquetOptions(SinkOptions):
    path: str = Field(description="directory template; may use {channel} and {date} (UTC, from unix_ts)",
                      json_schema_extra={"path": "output"})
    roll_bytes: int = Field(default=64 << 20, ge=1, description="complete a file once it holds about this much")
    roll_interval: Duration = Field(default=300.0, description="complete a file at least this often")
    row_group_rows: int = Field(default=10000, ge=1, description="rows buffered before a row group is written")
    compression: str = Field(default="zstd", description="zstd, snappy, gzip, lz4 or none")
    complete_on_flush: bool = Field(default=True, description="a runtime flush (before a source commits offsets) "
                                                              "completes the open files")

    @field_validator("path")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            v.format(channel="c", date="d")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"path may only use {{channel}} and {{date}}: {exc}") from None
        return v

    @field_validator("compression")
    @classmethod
    def _codec(cls, v: str) -> str:
        if v not in ("zstd", "snappy", "gzip", "lz4", "none"):
            raise ValueError(f"expected zstd, snappy, gzip, lz4 or none, got {v!r}")
        return v


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else (None if v is None else str(v))


def _int(v: Any) -> int | None:
    return v if type(v) is int and -(1 << 63) <= v < (1 << 63) else None


def row(event: Event) -> tuple[Any, ...]:
    """One event as a row in COLUMNS order; `raw` is the whole event as JSON."""
    data = event.get("data")
    d = data if isinstance(data, dict) else {}
    unix = event.get("unix_ts")
    unix = float(unix) if isinstance(unix, int | float) and not isinstance(unix, bool) and math.isfinite(
        unix) and abs(unix) < 1e11 else None
    matched = d.get("matched")
    start = event_time_ms(event)
    return (channel(event) or None, _str(event.get("rtstream_id")), _str(event.get("rtstream_name")),
            _str(event.get("capture_session_id")), None if unix is None else int(unix * 1000), unix,
            start if -(1 << 63) <= start < (1 << 63) else None, _int(d.get("end")), _str(d.get("text")),
            d.get("is_final") if type(d.get("is_final")) is bool else None, _str(d.get("event_label")),
            _str(d.get("severity")), [str(m) for m in matched] if isinstance(matched, list) else None,
            orjson.dumps(event, default=str).decode())


class _Dir:
    """One output directory: rows waiting for a row group, and the file being written."""

    __slots__ = ("dir", "fh", "kept", "kept_bytes", "nbytes", "opened", "rows", "tmp", "writer")

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rows: list[tuple[Any, ...]] = []
        self.nbytes = 0  # JSON size of `rows`
        self.writer: Any = None
        self.fh: Any = None
        self.tmp: Path | None = None
        self.opened = 0.0
        self.kept: list[str] = []  # the rows of the open file, as JSON (the `raw` column)
        self.kept_bytes = 0


class ParquetSink(Sink):
    """Writes events to rolled Parquet files with a fixed schema; a file appears only when complete."""

    name = "parquet"
    Options = ParquetOptions

    def __init__(self, options: ParquetOptions, context: Context) -> None:
        super().__init__(options, context)
        self._templated = "{" in options.path
        self._dirs: dict[str, _Dir] = {}
        self._swept: set[str] = set()  # directories whose leftovers were looked for (once each, not per re-open)
        self._day = UtcDays()
        self._channel = ChannelNames()
        self._timer: asyncio.Task[None] | None = None
        self._schema: Any = None
        self.files = 0
        self._lock = asyncio.Lock()
        self._failed: SinkFailed | None = None
        self._current = 0  # rows of the batch write() is taking (the runtime counts them as written only after)

    async def start(self) -> None:
        try:
            self._schema = schema()
        except ImportError:
            raise StageError(f"{self.context.stage}: the parquet sink needs pyarrow: "
                             "pip install 'videodb-pipeline[parquet]'") from None
        if not self._templated:
            ensure_private_dir(Path(self.options.path))
        self._timer = asyncio.create_task(self._roll_periodically(), name=f"{self.context.stage}-roll")

    def report(self) -> dict[str, int]:
        return {"files": self.files}

    def holding_since(self) -> float | None:
        """When the oldest row not yet in a complete file arrived (a `kill -9` takes it with the open file)."""
        return min((d.opened for d in self._dirs.values() if d.opened), default=None)

    def _dir_for(self, event: Event) -> str:
        ch = self._channel(channel(event))
        return self.options.path.format(channel=ch, date=self._day(event.get("unix_ts")))

    async def write(self, batch: Batch) -> None:
        async with self._lock:
            if self._failed is not None:  # the roll timer failed: refuse before buffering (the runtime dead-letters)
                raise StageError(str(self._failed))
            templated = self._templated
            target = None if templated else self._get(self.options.path)
            for event in batch:
                try:
                    r = row(event)
                except TypeError as exc:  # JSON cannot hold it (e.g. an integer past 64 bits): that one, not the batch
                    self.context.stats.errors += 1
                    self.context.stats.sent -= 1  # the runtime counts the whole batch as written
                    # an unwritable dead letter counts it as lost, once: raising made the runtime count the
                    # whole batch again while its other rows were still written
                    with contextlib.suppress(PipelineError):
                        self.context.dead_letter.write(f"cannot encode as JSON: {exc}", stage=self.context.stage,
                                                       event=event)
                    continue
                d = self._get(self._dir_for(event)) if templated else target
                assert d is not None
                d.rows.append(r)
                d.nbytes += len(r[-1])
                self._current += 1
            try:
                await self._write_due()
            finally:
                self._current = 0

    async def _write_due(self) -> None:
        now = time.monotonic()
        waiting = 0
        for d in list(self._dirs.values()):
            if d.rows and not d.opened:
                d.opened = now  # the file's clock starts with its first row
            if len(d.rows) >= self.options.row_group_rows:
                await self._write_rows(d)
            waiting += d.nbytes
        if waiting >= MAX_WAITING_BYTES:  # big events: bounded in bytes too, not only in rows
            for d in list(self._dirs.values()):
                await self._write_rows(d)
        await self._roll_due(force=sum(d.kept_bytes for d in self._dirs.values()) >= MAX_KEPT_BYTES)

    def _get(self, path: str) -> _Dir:
        d = self._dirs.get(path)
        if d is None:
            d = self._dirs[path] = _Dir(Path(path))
            if path not in self._swept:  # the file a killed run (any pid, any run) was writing there
                if len(self._swept) >= MAX_SWEPT:
                    self._swept.clear()
                self._swept.add(path)
                remove_stale(d.dir, PARQUET_TMP)
        return d

    async def _write_rows(self, d: _Dir) -> None:
        """Append the buffered rows to the directory's open file as one row group (off the event loop)."""
        if not d.rows:
            return
        rows, d.rows = d.rows, []
        d.nbytes = 0
        try:
            await asyncio.to_thread(self._append, d, rows)
        except (OSError, ValueError, TypeError, StageError) as exc:  # StageError: a file or symlink in the way
            await self._give_up(d, [r[-1] for r in rows], exc, "cannot write")
        d.kept += [r[-1] for r in rows]
        d.kept_bytes += sum(len(r[-1]) for r in rows)

    async def _finish(self, d: _Dir) -> None:
        """Write the directory's waiting rows and complete its open file."""
        await self._write_rows(d)
        try:
            await asyncio.to_thread(self._complete, d)
        except (OSError, ValueError) as exc:
            await self._give_up(d, [], exc, "cannot complete")

    async def _give_up(self, d: _Dir, rows: list[str], exc: BaseException, what: str) -> NoReturn:
        """A file failed: remove it unfinished (it has no footer, no reader could open it) and dead-letter every
        row it held, besides `rows` (JSON) that were being added. Before, the rows of its earlier row groups
        stayed counted as written, and at shutdown the broken file was given its final name."""
        held = d.kept
        d.kept, d.kept_bytes = [], 0
        await asyncio.to_thread(self._discard, d)
        rows = held + rows
        self.context.stats.errors += len(rows)
        self.context.stats.sent -= max(0, len(rows) - self._current)  # counted as written by earlier batches
        self._current = 0
        for k, raw in enumerate(rows):
            try:
                self.context.dead_letter.write(f"parquet: {exc}", stage=self.context.stage,
                                               event=orjson.loads(raw))
            except PipelineError:  # the dead letter counted this one as lost; the rest are lost too, once
                self.context.dead_letter.lose(len(rows) - k - 1)
                break
        raise SinkFailed(f"{self.context.stage}: {d.dir}: {what}: {exc}") from None

    @staticmethod
    def _discard(d: _Dir) -> None:
        writer, fh, tmp = d.writer, d.fh, d.tmp
        d.writer = d.fh = d.tmp = None
        d.opened = 0.0
        for step in (getattr(writer, "close", None), getattr(fh, "close", None),
                     tmp.unlink if tmp is not None else None):
            with contextlib.suppress(Exception):  # what failed before may fail again: the rows are dead-lettered
                if step is not None:
                    step()

    def _append(self, d: _Dir, rows: list[tuple[Any, ...]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if d.writer is None:
            ensure_private_dir(d.dir)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            name = f"part-{stamp}-{os.getpid()}-{_RUN}-{next(_SEQ):05d}.parquet"
            d.tmp = d.dir / f".{name}.tmp"
            d.fh = open_private(d.tmp, truncate=True)
            with contextlib.suppress(OSError):  # held until closed: `remove_stale` leaves a file being written
                fcntl.flock(d.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            codec = None if self.options.compression == "none" else self.options.compression
            d.writer = pq.ParquetWriter(d.fh, self._schema, compression=codec)
            d.opened = d.opened or time.monotonic()
        cols = list(zip(*rows, strict=True))
        table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, self._schema, strict=True)],
                                     schema=self._schema)
        d.writer.write_table(table)

    def _complete(self, d: _Dir) -> None:
        """Close the open file and give it its final name (atomic: readers see all of it or nothing)."""
        if d.writer is None:
            return
        tmp = d.tmp
        assert tmp is not None
        d.writer.close()
        d.fh.close()
        os.replace(tmp, tmp.with_name(tmp.name[1:-4]))
        d.writer = d.fh = d.tmp = None
        d.opened = 0.0
        d.kept, d.kept_bytes = [], 0
        self.files += 1

    def _size(self, d: _Dir) -> int:
        try:
            return os.fstat(d.fh.fileno()).st_size if d.fh is not None else 0
        except (OSError, ValueError):
            return 0

    async def _roll_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for path, d in list(self._dirs.items()):
            if d.writer is None and not d.rows:
                if len(self._dirs) > MAX_OPEN_DIRS:
                    del self._dirs[path]
                continue
            if force or now - d.opened >= self.options.roll_interval or self._size(d) >= self.options.roll_bytes:
                await self._finish(d)
        if len(self._dirs) > MAX_OPEN_DIRS:  # {date}/{channel} paths: do not keep every directory open
            for d in list(self._dirs.values())[: len(self._dirs) - MAX_OPEN_DIRS]:
                await self._finish(d)

    async def flush(self) -> None:
        async with self._lock:
            for d in list(self._dirs.values()):
                await self._write_rows(d)
            if self.options.complete_on_flush:
                await self._roll_due(force=True)

    async def _roll_periodically(self) -> None:
        interval = max(0.05, min(self.options.roll_interval, 1.0))
        while True:
            await asyncio.sleep(interval)
            async with self._lock:
                try:
                    await self._roll_due()
                except SinkFailed as exc:
                    self._failed = exc  # the next write() or close() reports it
                    return

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        async with self._lock:
            failed = self._failed  # the roll timer's: reported once the other directories are complete
            for d in list(self._dirs.values()):  # every directory, also after one failed: the rest are good rows
                try:
                    await self._finish(d)
                except SinkFailed as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed

"""Sink `jsonl`: seed-compatible JSON lines (the event plus `ts`/`unix_ts`).

Lines are buffered per file and written whole (a write never ends mid-line on
our side), every `flush_interval`, when the buffers pass `buffer_bytes`, and
at shutdown. Files are opened at the flush, at most MAX_OPEN_FILES kept open
(least recently written closed first), so one file per session stays cheap
with any number of live sessions; a templated file not written for IDLE_CLOSE
seconds is closed (a finished session's or yesterday's file is not held open). Files are 0600 in 0700 directories;
symlinked paths are refused. A file deleted or renamed (logrotate) under us
is opened again at the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from typing import Any, BinaryIO

import orjson
from pydantic import Field, field_validator

from pipeline.api import Batch, Context, Event, Sink, SinkOptions
from pipeline.errors import PipelineError, SinkFailed, StageError
from pipeline.events import channel
from pipeline.files import open_private, still_names
from pipeline.types import Duration
from stages.sinks.channel_dirs import ChannelNames
from stages.sinks.dates import UtcDays

_DUMP = orjson.dumps
_OPTS = orjson.OPT_APPEND_NEWLINE
MAX_OPEN_FILES = 32
IDLE_CLOSE = 60.0  # seconds without a write after which a templated file is closed
NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs, tmpfs
_SAFE_SESSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")  # the ids the session API accepts (128 long)


def _session_name(sid: Any) -> str:
    """The session id as a file-name part: it comes from the wire, so anything odd becomes `unknown`."""
    return sid if type(sid) is str and _SAFE_SESSION.match(sid) else "unknown"


class JsonlOptions(SinkOptions):
    path: str = Field(description="file path; may use {channel}, {date} (UTC, from unix_ts), {capture_session_id}",
                      json_schema_extra={"path": "output"})
    clear: bool = Field(default=False, description="empty the file(s) when the first event arrives")
    flush_interval: Duration = Field(default=1.0, description="write buffered lines this often; 0 = every batch")
    buffer_bytes: int = Field(default=1 << 20, ge=0, description="write once this much is buffered")
    fsync: bool = Field(default=False, description="fsync after each flush (durable across power loss)")

    @field_validator("path")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            v.format(channel="c", date="d", capture_session_id="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"path may only use {{channel}}, {{date}} and {{capture_session_id}}: {exc}") from None
        # The longest names the wire can give: one file name too long for the file system would fail the
        # sink for every session at its first flush, so the template is checked now.
        worst = v.format(channel="c" * 64, date="2026-01-01", capture_session_id="s" * 128)
        longest = max((len(part.encode()) for part in worst.split("/")), default=0)
        if longest > NAME_MAX:
            raise ValueError(f"a file name in this path can reach {longest} bytes (with a 64-character channel and a "
                             f"128-character session id, the longest kept); most file systems allow {NAME_MAX}: "
                             "use fewer placeholders per name, or put one in a directory name")
        return v


class _File:
    __slots__ = ("fh", "path", "used")

    def __init__(self, path: str, fh: BinaryIO) -> None:
        self.path = path
        self.fh = fh
        self.used = time.monotonic()  # when it was last opened or written

    def reopen_if_replaced(self) -> None:
        """Deleted or renamed (logrotate) under us: open the path again (a symlink or directory is refused)."""
        if not still_names(self.path, self.fh):
            fh = open_private(self.path)
            self.fh.close()
            self.fh = fh


def _whole_lines_kept(f: _File, buf: bytearray, done: int) -> int:
    """How much of `buf` the file keeps after a write that took only its first `done` bytes: a line the device
    took part of is cut off the file again (a truncate frees space, so a full disk allows it), so the file
    holds whole lines and that line is dead-lettered whole. If the cut is refused, `done`."""
    whole = buf.rfind(b"\n", 0, done) + 1
    if whole < done:
        try:
            fd = f.fh.fileno()
            os.ftruncate(fd, os.fstat(fd).st_size - (done - whole))
        except OSError:
            return done
    return whole


class JsonlSink(Sink):
    """Appends events as JSON lines to one file, or one file per channel/date."""

    name = "jsonl"
    Options = JsonlOptions

    def __init__(self, options: JsonlOptions, context: Context) -> None:
        super().__init__(options, context)
        self._templated = "{" in options.path
        self._dated = "{date}" in options.path
        self._per_session = "{capture_session_id}" in options.path
        self._day = UtcDays()
        self._channel = ChannelNames()
        self._files: dict[str, _File] = {}  # open files, least recently written first (at most MAX_OPEN_FILES)
        self._bufs: dict[str, bytearray] = {}  # path -> lines not written yet
        self._buffered = 0  # bytes in _bufs, so buffer_bytes bounds all files together
        self._cleared: set[str] = set()
        self._last_flush = time.monotonic()
        self._timer: asyncio.Task[None] | None = None
        self._failed: SinkFailed | None = None
        self._pending_clear = False

    def continue_from(self, previous: Sink) -> None:
        """A reload re-created this sink (called before start()): the files its predecessor emptied hold this
        run's output, which `clear` must not empty again (everything written before the reload was lost)."""
        if isinstance(previous, JsonlSink):
            done = set(previous._cleared)
            if previous._pending_clear:  # it never wrote: its file still holds the previous run's lines
                done.discard(previous.options.path)
            self._cleared |= done

    async def start(self) -> None:
        if not self._templated:
            # Opened now, so a bad path fails at start; with `clear` emptied only at the first write, so a
            # run whose source never opens (a typo in a replay path) keeps the previous results.
            fresh = self.options.path not in self._cleared
            self._cleared.add(self.options.path)
            self._open(self.options.path)
            self._pending_clear = self.options.clear and fresh
        if self.options.flush_interval > 0 or self._templated:  # templated: idle files close on a quiet run too
            self._timer = asyncio.create_task(self._flush_periodically(), name=f"{self.context.stage}-flush")

    def _open(self, path: str) -> _File:
        """The open file for `path` (most recently used now); past MAX_OPEN_FILES the least recent is closed.

        Only flushes call this (and `start` for a fixed path), so with more live files than the cap a file
        is reopened at most once per flush, never once per event.
        """
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_FILES:  # {date}/{session} paths: don't hold every file open forever
                self._files.pop(next(iter(self._files))).fh.close()
            truncate = self.options.clear and path not in self._cleared and not self.context.session.resuming
            if self.options.clear:
                self._cleared.add(path)
            f = _File(path, open_private(path, truncate=truncate))
        else:
            try:
                f.reopen_if_replaced()  # one stat per file and flush: lines never go to a deleted file
            except BaseException:
                f.fh.close()
                raise
        f.used = time.monotonic()
        self._files[path] = f
        return f

    def _close_idle(self, now: float) -> None:
        """Close templated files not written for IDLE_CLOSE (least recently written first, so stop at a busy one).

        Without this a finished session's file (or yesterday's `{date}` file) stayed open until MAX_OPEN_FILES
        newer ones pushed it out: for ever on a quiet pipeline, its disk space held after it was deleted."""
        while self._files:
            path, f = next(iter(self._files.items()))
            if now - f.used < IDLE_CLOSE:
                return
            del self._files[path]
            f.fh.close()

    def _buf(self, path: str) -> bytearray:
        buf = self._bufs.get(path)
        if buf is None:
            buf = self._bufs[path] = bytearray()
        return buf

    def buffered_bytes(self) -> int:
        """Bytes of lines waiting for the next flush, all files together."""
        return self._buffered

    def _path_for(self, event: Event) -> str:
        ch = self._channel(channel(event))
        day = self._day(event.get("unix_ts")) if self._dated else ""
        sid = _session_name(event.get("capture_session_id")) if self._per_session else ""
        return self.options.path.format(channel=ch, date=day, capture_session_id=sid)

    async def write(self, batch: Batch) -> None:
        if self._failed is not None:  # the flush timer failed: refuse, the runtime dead-letters this batch
            raise StageError(str(self._failed))
        if self._templated:
            self._write_templated(batch)
        else:
            if self._pending_clear:
                self._pending_clear = False
                if not self.context.session.resuming:  # a restart resuming the session appends to its output
                    self._open(self.options.path).fh.truncate(0)
            buf = self._buf(self.options.path)
            mark = len(buf)
            try:
                for e in batch:  # one line at a time: each temporary is freed at once, the heap stays small
                    buf += _DUMP(e, option=_OPTS, default=str)
            except TypeError:  # an event JSON cannot hold (orjson.JSONEncodeError): that one, not the batch
                del buf[mark:]
                self._write_each(batch)
            else:
                self._buffered += len(buf) - mark
        if (time.monotonic() - self._last_flush >= self.options.flush_interval
                or self._buffered >= self.options.buffer_bytes):
            self.flush_now(current=len(batch))

    def _write_templated(self, batch: Batch) -> None:
        for event in batch:
            try:
                line = _DUMP(event, option=_OPTS, default=str)
            except TypeError as exc:
                self._unwritable(event, exc)
                continue
            self._buf(self._path_for(event)).extend(line)
            self._buffered += len(line)

    def _write_each(self, batch: Batch) -> None:
        buf = self._buf(self.options.path)
        for event in batch:
            try:
                line = _DUMP(event, option=_OPTS, default=str)
            except TypeError as exc:
                self._unwritable(event, exc)
                continue
            buf += line
            self._buffered += len(line)

    def _unwritable(self, event: Event, exc: Exception) -> None:
        """Dead-letter one event JSON cannot encode; the runtime counted it as written, so move it.

        If the dead-letter file cannot take it, the dead letter counts it as lost and the batch goes on (the
        runtime sees the loss and stops the run): raising here made the runtime count the whole batch again,
        as lost, while its other events were still written.
        """
        self.context.stats.errors += 1
        self.context.stats.sent -= 1
        with contextlib.suppress(PipelineError):  # counted once, by the dead letter, as lost
            self.context.dead_letter.write(f"cannot encode as JSON: {exc}", stage=self.context.stage, event=event)

    async def flush(self) -> None:
        self.flush_now()

    def flush_now(self, current: int = 0) -> None:
        """Write every buffer whole; if the disk refuses, dead-letter every unwritten line and raise.

        `current` = events of the batch being written now (not yet counted as sent by the runtime).
        """
        self._last_flush = now = time.monotonic()
        if self._templated:
            self._close_idle(now)
        if not self._buffered:
            return
        # Detach the buffers first: a view a tracer or profiler keeps alive can then never block
        # appending to new ones (bytearray refuses to resize while exported).
        pending, self._bufs = self._bufs, {}
        self._buffered = 0
        for path, buf in pending.items():
            if not buf:
                continue
            done = 0
            f: _File | None = None
            try:
                f = self._open(path)
                with memoryview(buf) as view:
                    while done < len(buf):
                        done += f.fh.write(view[done:]) or 0
                if self.options.fsync:
                    os.fsync(f.fh.fileno())
            except (OSError, StageError) as exc:
                # What did not reach the files (this one's rest, and every file after it), nothing twice.
                if f is not None:
                    done = _whole_lines_kept(f, buf, done)
                pending[path] = buf[done:]
                self._bufs = {p: b for p, b in pending.items() if b}
                why = str(exc) if isinstance(exc, StageError) else f"{path}: cannot write: {exc.strerror or exc}"
                self._failed = SinkFailed(why)
                self._dead_letter_buffers(str(self._failed), current)
                raise self._failed from None
            pending[path] = bytearray()  # written: not dead-lettered if a later file fails

    def _dead_letter_buffers(self, reason: str, current: int) -> None:
        """Nothing accepted is lost silently: unwritten lines go to the dead letter, uncounted as written."""
        lines = lost = 0
        for buf in self._bufs.values():
            for line in bytes(buf).splitlines():
                if not line:
                    continue
                lines += 1
                if lost:  # the dead-letter file failed too: the rest are counted as lost, not tried one by one
                    lost += 1
                    continue
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:  # the tail of a line the device took half of
                    event = {"raw": line.decode("utf-8", "replace")}
                try:
                    self.context.dead_letter.write(reason, stage=self.context.stage, event=event)
                except PipelineError:  # counted as lost by the dead letter, which the runtime reports
                    lost = 1
        if lost > 1:
            self.context.dead_letter.lose(lost - 1)
        self._bufs = {}
        self._buffered = 0
        self.context.stats.errors += lines
        # Lines of earlier batches were counted as sent; the current batch's were not (the runtime counts a
        # batch only once write() returns), so the lines of it that reached the file are counted here.
        self.context.stats.sent += current - lines

    async def _flush_periodically(self) -> None:
        every = self.options.flush_interval or IDLE_CLOSE / 2  # 0: writes flush themselves; this closes idle files
        while self._failed is None:
            await asyncio.sleep(every)
            if time.monotonic() - self._last_flush >= every:
                try:
                    self.flush_now()
                except SinkFailed:
                    return  # kept in self._failed: the next write() or close() reports it

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            if self._failed is not None:
                raise self._failed
            self.flush_now()
        finally:
            for f in self._files.values():
                f.fh.close()
            self._files.clear()

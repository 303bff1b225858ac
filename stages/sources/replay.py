"""Source `replay`: a recorded JSONL file (the format VideoDB's ws_listener.py writes), at any speed.

`speed: 0` reads as fast as possible; `speed: N` paces events at N x real time
by their `unix_ts`. Existing `ts`/`unix_ts` stamps are kept. A malformed or
truncated line is dead-lettered with file, line number and reason; the run
goes on.
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from itertools import islice
from typing import Any

import orjson
from pydantic import Field

from pipeline.api import Batch, Context, Options, Source
from pipeline.errors import StageError
from pipeline.events import Stamper, edge_reason, edge_rejects
from stages.sources.pipe_lines import PipeLines

MAX_LINE = 4 << 20  # bytes per line, newline included (4 x the WebSocket frame limit): a longer one is dead-lettered
#                    and skipped, never held whole
PIECE = 64 << 10  # a batch reads lines this long at most: a batch of 256 reads at most 16 MiB before a longer
#                   line is made whole or skipped (with MAX_LINE, 1 GiB: 8 s of a sparse file before SIGTERM)
SKIP_CHUNK = 1 << 20  # the rest of a line too long is read and thrown away this much at a time


class ReplayOptions(Options):
    path: str = Field(description="JSONL file to replay (relative: to the config file)",
                      json_schema_extra={"path": "input"})
    speed: float = Field(default=0.0, ge=0, description="0 = as fast as possible, 1 = real time, 10 = 10x")
    # 256: a batch then stays in the CPU cache through every stage (measured 20-30% faster than 1024)
    batch_size: int = Field(default=256, ge=1, description="most events per batch")


class ReplaySource(Source):
    """Reads a JSONL file line by line into batches."""

    name = "replay"
    resumes = False  # every run reads the file from the start, so rule state starts empty too
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions, context: Context) -> None:
        super().__init__(options, context)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._stamp = Stamper()
        self.lines = 0
        self.position = 0  # bytes of the file read so far (for a progress bar)
        self.batch_bytes = 0  # raw bytes of the batch just yielded (the runtime bounds queues by bytes)
        self._pipe: PipeLines | None = None

    async def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        if self._pipe is not None:
            self._pipe.close()

    def _reject(self, lineno: int, reason: str, raw: bytes) -> None:
        self.context.stats.dropped += 1
        self.context.dead_letter.write(reason, stage=self.context.stage,
                                       origin={"file": self.options.path, "line": lineno}, raw=raw[:4096])

    def _parse(self, lines: list[bytes], first: int) -> Batch:
        """Parse lines numbered from `first`; bad ones are dead-lettered, the rest stamped."""
        loads = orjson.loads
        stamp = self._stamp
        try:  # fast path: every line a JSON object (a whole chunk in one comprehension)
            events: Batch = [loads(raw) for raw in lines]
        except orjson.JSONDecodeError:
            return self._stamped(self._parse_each(lines, first))
        for event in events:
            if type(event) is not dict:  # a JSON value that is not an object: sort the chunk out line by line
                return self._stamped(self._parse_each(lines, first))
            if "unix_ts" not in event:
                stamp(event)
        rejects = edge_rejects(lines, events)  # ids and nesting, on the same indexes
        if rejects:
            for i, reason in rejects:
                self._reject(first + i, reason, lines[i])
            bad = {i for i, _ in rejects}
            events = [e for i, e in enumerate(events) if i not in bad]
        return events

    def _stamped(self, events: Batch) -> Batch:
        for e in events:
            if "unix_ts" not in e:
                self._stamp(e)
        return events

    def _parse_each(self, lines: list[bytes], first: int) -> Batch:
        out: Batch = []
        for lineno, raw in enumerate(lines, first):
            if not raw.strip():
                continue
            try:
                event: Any = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                truncated = not raw.endswith(b"\n")
                self._reject(lineno, "truncated last line" if truncated else f"not JSON: {exc}", raw)
                continue
            if not isinstance(event, dict):
                self._reject(lineno, f"JSON {type(event).__name__}, not an object", raw)
                continue
            reason = edge_reason(raw, event)
            if reason is not None:
                self._reject(lineno, reason, raw)
                continue
            out.append(event)
        return out

    async def _bounded(self, fh: Any, lines: list[bytes], first: int) -> list[bytes]:
        """`lines` (read PIECE bytes at most each) with each line read in several pieces whole again, and every
        line over MAX_LINE dead-lettered with a blank line in its place: its pieces read as further lines of the
        batch are dropped, and its rest is read and thrown away SKIP_CHUNK bytes at a time, so a multi-GB line
        with no newline is never held whole. The loop runs between those reads, and a stop ends the skipping
        (a 1 TiB line took minutes, SIGTERM too)."""
        out: list[bytes] = []
        pieces = iter(lines)
        for raw in pieces:
            if len(raw) < PIECE or raw.endswith(b"\n"):
                out.append(raw)
                continue
            parts, size, last = [raw], len(raw), raw
            for last in pieces:  # the line's next pieces, read as lines of this batch
                size += len(last)
                if size <= MAX_LINE:
                    parts.append(last)
                if last.endswith(b"\n"):
                    break
            else:  # the rest from the file: whole up to the limit (one byte past it at most), then skipped
                while not last.endswith(b"\n"):
                    if size <= MAX_LINE:
                        last = fh.readline(MAX_LINE + 1 - size)
                        if size + len(last) <= MAX_LINE:
                            parts.append(last)
                    elif self._stopping:
                        break
                    else:
                        last = fh.readline(SKIP_CHUNK)
                        await asyncio.sleep(0)
                    if not last:  # the file's end: its last line has no newline
                        break
                    size += len(last)
            if size <= MAX_LINE:
                out.append(b"".join(parts))
                continue
            self.position += size - 1  # the blank line in its place counts the last byte
            shown = f"{size} bytes" if last.endswith(b"\n") or not self._stopping else \
                f"over {size} bytes (the run stopped before its end)"
            self._reject(first + len(out), f"line of {shown}, over the {MAX_LINE >> 20} MiB limit: skipped", raw)
            out.append(b"\n")
        return out

    def _lines(self, fh: Any) -> Iterator[bytes]:
        """The file's lines, each read only up to PIECE bytes (all in C: no Python call per line); a longer line
        comes in pieces, which `_bounded` makes whole again (or dead-letters)."""
        return iter(partial(fh.readline, PIECE), b"")

    async def batches(self) -> AsyncIterator[Batch]:
        path = self.options.path
        try:  # non-blocking: a named pipe opened for reading waits for a writer, and the loop must not
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise StageError(f"{path}: cannot open replay file: {exc.strerror or exc}") from None
        self._stamp = Stamper()
        speed = self.options.speed
        size = self.options.batch_size
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            self._pipe = PipeLines(fd, MAX_LINE)
            try:
                batches = self._paced(self._pipe_lines(self._pipe), speed, size) if speed else \
                    self._from_pipe(self._pipe, size)
                async for batch in batches:
                    yield batch
            finally:
                os.close(fd)
            return
        os.set_blocking(fd, True)
        fh = open(fd, "rb", buffering=1 << 20)  # noqa: SIM115 - closed in finally, across yields
        try:
            if speed:
                async for batch in self._paced(self._file_lines(fh), speed, size):
                    yield batch
                return
            # As fast as possible: read `size` lines at a time and parse them in one go.
            lineno = 1
            read = self._lines(fh)
            while not self._stopping:
                lines = list(islice(read, size))
                if not lines:
                    break
                if max(map(len, lines)) >= PIECE:
                    lines = await self._bounded(fh, lines, lineno)
                lineno, batch = self._batch(lines, lineno)
                if batch:
                    yield batch
        finally:
            fh.close()

    def _batch(self, lines: list[bytes], lineno: int) -> tuple[int, Batch]:
        """Parse the lines numbered from `lineno`, counting them; the next line's number and the events."""
        self.lines = lineno + len(lines) - 1
        batch = self._parse(lines, lineno)
        raw = sum(map(len, lines))
        self.position += raw  # bytes read so far (tell() fails on a pipe)
        if batch:
            self.batch_bytes = raw  # raw size, for the runtime's byte bounds
        return lineno + len(lines), batch

    async def _from_pipe(self, pipe: PipeLines, size: int) -> AsyncIterator[Batch]:
        """As fast as the writer writes: the lines there are now, `size` at a time."""
        async for lineno, lines in self._pipe_chunks(pipe):
            for i in range(0, len(lines), size):
                lineno, batch = self._batch(lines[i:i + size], lineno)
                if batch:
                    yield batch

    async def _pipe_lines(self, pipe: PipeLines) -> AsyncIterator[bytes | None]:
        """The pipe's lines, and None after those there were (the paced batch goes then, not once full)."""
        async for _, lines in self._pipe_chunks(pipe):
            for raw in lines:
                yield raw
            yield None

    async def _pipe_chunks(self, pipe: PipeLines) -> AsyncIterator[tuple[int, list[bytes]]]:
        """(number of its first line, lines) as the pipe has them; the long lines, replaced by blank ones, are
        dead-lettered here (as `_bounded` does for a file)."""
        lineno = 1
        while not self._stopping and (got := await pipe.chunk()) is not None:
            lines, longs = got
            for long in longs:
                self.position += long.size - 1  # the blank line in its place counts the last byte
                self._reject(lineno + long.index, f"line of {long.size} bytes, over the {MAX_LINE >> 20} MiB "
                             "limit: skipped", long.head)
            yield lineno, lines
            lineno += len(lines)

    async def _file_lines(self, fh: Any) -> AsyncIterator[bytes | None]:
        for lineno, raw in enumerate(self._lines(fh), 1):
            yield (await self._bounded(fh, [raw], lineno))[0] if len(raw) >= PIECE else raw

    async def _paced(self, lines: AsyncIterator[bytes | None], speed: float, size: int) -> AsyncIterator[Batch]:
        """Yield events at `speed` x the pace of their `unix_ts` (and what a pipe had so far, None)."""
        batch: Batch = []
        self.batch_bytes = 0
        t0_wall: float | None = None
        t0_event = 0.0
        lineno = 0
        async for raw in lines:
            if self._stopping:
                break
            if raw is None:
                if batch:
                    yield batch
                    batch, self.batch_bytes = [], 0
                continue
            lineno += 1
            self.lines = lineno
            self.position += len(raw)
            parsed = self._parse([raw], lineno)
            if not parsed:
                continue
            event = parsed[0]
            unix = event["unix_ts"]
            if not isinstance(unix, int | float) or isinstance(unix, bool) or not math.isfinite(unix):
                self._reject(lineno, f"unix_ts is not a number ({unix!r}); cannot pace it", raw)
                continue
            if t0_wall is None:
                t0_wall, t0_event = time.monotonic(), float(unix)
            due = t0_wall + (float(unix) - t0_event) / speed
            delay = due - time.monotonic()
            if delay > 0.001:
                if batch:
                    yield batch
                    batch, self.batch_bytes = [], 0
                try:  # a stop() ends the wait at once
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except TimeoutError:
                    pass
            batch.append(event)
            self.batch_bytes += len(raw)
            if len(batch) >= size:
                yield batch
                batch, self.batch_bytes = [], 0
        if batch:
            yield batch

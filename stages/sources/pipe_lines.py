"""Lines of a named pipe as they come, read without ever blocking the event loop.

Why: the replay source reads a file `batch_size` lines at a time in one blocking call, which is what a
file wants. On a named pipe fed by a live writer (`tail -f videodb_events.jsonl > pipe`) that call waited
for 256 lines with the whole pipeline stopped: events written a second ago were not passed on, timers and the
operator endpoint were silent, and SIGTERM took effect only once the writer closed its end. Opening the
pipe blocked the same way until a writer came.

Here the pipe is opened non-blocking and read when the loop says it is readable; each `chunk()` returns
the complete lines there are now. A line longer than `max_line` is never held whole: its first
HEAD_BYTES are kept for its dead-letter line, the rest is counted and thrown away.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

READ_SIZE = 1 << 16  # bytes per read() call
CHUNK_BYTES = 1 << 20  # a chunk() returns once it holds this much (the writer may never pause)
HEAD_BYTES = 4096  # what is kept of a line over the limit (for its dead-letter line)


@dataclass(slots=True)
class LongLine:
    """A line over the limit, replaced by a blank line at `index` of its chunk."""

    index: int
    size: int  # its bytes, newline included
    head: bytes  # its first bytes


class PipeLines:
    """`chunk()`: the next complete lines (and the long ones among them); None once every writer closed."""

    def __init__(self, fd: int, max_line: int) -> None:
        self.fd = fd
        self.max_line = max_line
        self._buf = bytearray()
        self._long: tuple[int, bytes] | None = None  # a long line being skipped: bytes so far, its head
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        # read() finds no writer before the first one opened the pipe, the same as after the last one closed
        # it (end of file); the loop says it is readable only once one did (data, or that writer gone)
        self._opened = False

    def close(self) -> None:
        """Stop reading: a `chunk()` waiting for the writer returns what it has (None if nothing)."""
        self._closed = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def chunk(self) -> tuple[list[bytes], list[LongLine]] | None:
        lines: list[bytes] = []
        longs: list[LongLine] = []
        got = 0
        while True:
            if self._closed:
                return (lines, longs) if lines or longs else None
            if not self._opened:
                await self._readable()
                self._opened = True
                continue
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                if lines or longs:
                    return lines, longs
                await self._readable()
                continue
            if not data:  # every writer closed its end (a pipe never opened by one is not readable)
                if self._long is not None:  # a long last line without its newline
                    longs.append(LongLine(len(lines), *self._long))
                    lines.append(b"\n")
                    self._long = None
                elif self._buf:  # a last line without its newline, as a file's
                    lines.append(bytes(self._buf))
                    self._buf.clear()
                return (lines, longs) if lines or longs else None
            got += len(data)
            self._take(data, lines, longs)
            if got >= CHUNK_BYTES:
                if lines or longs:
                    return lines, longs
                got = 0  # inside a long line a writer keeps ahead of: let the loop run (a stop, timers) meanwhile
                await asyncio.sleep(0)

    def _take(self, data: bytes, lines: list[bytes], longs: list[LongLine]) -> None:
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if self._long is not None:  # inside a long line: count, keep nothing
                size, head = self._long
                if end < 0:
                    self._long = (size + len(data) - start, head)
                    return
                longs.append(LongLine(len(lines), size + end + 1 - start, head))
                lines.append(b"\n")
                self._long = None
            elif end < 0:
                self._buf += data[start:]
                if len(self._buf) > self.max_line:  # (exactly max_line bytes at the end of the pipe: whole)
                    self._long = (len(self._buf), bytes(self._buf[:HEAD_BYTES]))
                    self._buf.clear()
                return
            else:
                piece = data[start:end + 1]
                if self._buf:
                    self._buf += piece
                    piece = bytes(self._buf)
                    self._buf.clear()
                if len(piece) > self.max_line:
                    longs.append(LongLine(len(lines), len(piece), piece[:HEAD_BYTES]))
                    piece = b"\n"
                lines.append(piece)
            start = end + 1

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = self._ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)
            self._ready = None

"""An append-only on-disk queue of batches for one sink: segments of CRC-checked records plus an ack offset.

Layout of a spool directory (0700, files 0600):

- `<offset>.seg`: segments; the name is the spool-wide byte offset of the segment's first
  record, so a position in the spool is one integer. Records are appended whole with one
  `write()`: a 12-byte header `<length, events, crc32>` then the payload (an orjson array).
  The CRC covers the header's first 8 bytes and the payload, so a torn or corrupt record
  is detected, never delivered.
- `ack`: the offset up to which the sink has taken delivery; two 24-byte slots
  `<generation, offset, crc32>` written alternately, so a torn ack write leaves the
  previous one readable. Segments entirely below the ack offset are deleted.
- `lock`: `flock`-ed while a pipeline uses the spool (one process per spool).

No fsync: a spool survives `kill -9` (the page cache is the kernel's), not power loss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import StageError
from pipeline.files import FILE_MODE, ensure_private_dir

_HEAD = struct.Struct("<III")  # payload length, event count, crc32(first 8 header bytes + payload)
_ACK = struct.Struct("<QQI")  # generation, offset, crc32(first 16 bytes)
_ACK_SLOT = 24
_SUFFIX = ".seg"
MAX_RECORD = 1 << 31  # the length field is 32 bits; a longer "length" is corruption


@dataclass(frozen=True, slots=True)
class Damage:
    """A byte range of a segment that held no valid record (torn tail, corruption): skipped."""

    segment: Path
    offset: int  # within the segment
    length: int
    reason: str
    raw: bytes  # the first bytes of the range, for the dead-letter line


@dataclass(slots=True)
class Record:
    """One spooled batch as read back: its events (still encoded) and where the next record starts."""

    end: int
    events: int
    payload: bytes


def _crc(head8: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(head8))


def encode(payload: bytes, events: int) -> bytes:
    """Header + payload, ready for one append."""
    head8 = struct.pack("<II", len(payload), events)
    return head8 + struct.pack("<I", _crc(head8, payload)) + payload


def _whole_record_at(data: bytes, pos: int) -> bool:
    """True when a complete record with a good CRC starts at `pos` of `data`."""
    head = data[pos:pos + _HEAD.size]
    if len(head) < _HEAD.size:
        return False
    length, _, crc = _HEAD.unpack(head)
    end = pos + _HEAD.size + length
    return end <= len(data) and _crc(head[:8], data[pos + _HEAD.size:end]) == crc


def undelivered_bytes(directory: Path) -> int:
    """Bytes a spool directory holds past its ack offset, read without opening (locking) it."""
    segs = sorted((int(p.name[: -len(_SUFFIX)]), p) for p in directory.glob(f"*{_SUFFIX}")
                  if p.name[: -len(_SUFFIX)].isdigit())
    if not segs:
        return 0
    acked = 0
    try:
        raw = (directory / "ack").read_bytes()
    except OSError:
        raw = b""
    gen = 0
    for slot in (0, 1):
        chunk = raw[slot * _ACK_SLOT: slot * _ACK_SLOT + _ACK.size]
        if len(chunk) == _ACK.size:
            g, off, crc = _ACK.unpack(chunk)
            if zlib.crc32(chunk[:16]) == crc and g > gen:
                gen, acked = g, off
    base, last = segs[-1]
    return max(base + last.stat().st_size - max(acked, segs[0][0]), 0)


def _open_file(path: Path, flags: int, what: str) -> int:
    """`os.open` (0600 when created), never through a symlink, only a regular file (a FIFO would block the
    event loop); failures are one-line StageErrors."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StageError(f"{path}: refusing to open a {what} through a symlink") from None
        raise StageError(f"{path}: cannot open {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StageError(f"{path}: cannot open {what}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def _names(path: Path, fd: int | None) -> bool:
    """`path` is still the file open as `fd` (any regular file, for None): not removed or replaced."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if fd is None:
            return stat.S_ISREG(st.st_mode)
        own = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class Spool:
    """Append-only, crash-tolerant queue of encoded batches with a durable consumer offset."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 << 20) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.acked = 0  # everything before this offset was delivered
        self.read_pos = 0  # next record to hand out (in memory only: a restart resumes at `acked`)
        self.write_pos = 0  # where the next record goes
        self.pending_events = 0  # events in [acked, write_pos)
        self._segments: list[int] = []  # base offsets, ascending
        self._fd: int | None = None  # the last segment, open for append
        self._rfd: tuple[int, int] | None = None  # (base, fd) of the segment being read
        self._ack_fd: int | None = None
        self._gen = 0
        self._lock_fd: int | None = None
        self._out: deque[tuple[int, int]] = deque()  # (end, events) handed out, not yet acked

    # --- open / recover ----------------------------------------------------------------

    def open(self) -> list[Damage]:
        """Lock, read the ack offset, drop delivered segments, validate the last one (torn tail)."""
        ensure_private_dir(self.dir)
        self._lock()
        self._read_ack()
        bases = sorted(int(p.name[: -len(_SUFFIX)]) for p in self.dir.glob(f"*{_SUFFIX}")
                       if p.name[: -len(_SUFFIX)].isdigit())
        damage: list[Damage] = []
        for i, base in enumerate(bases):
            nxt = bases[i + 1] if i + 1 < len(bases) else None
            if nxt is not None and nxt <= self.acked:
                self._path(base).unlink(missing_ok=True)  # fully delivered before a crash
            else:
                self._segments.append(base)
        if not self._segments:
            self._segments.append(self.acked)
            self._open_append(self.acked)
            self.read_pos = self.write_pos = self.acked
            return damage
        for base in self._segments:
            damage.extend(self._scan(base, last=base == self._segments[-1]))
        self._open_append(self._segments[-1])
        self.acked = self.read_pos = min(max(self.acked, self._segments[0]), self.write_pos)
        return damage

    def _scan(self, base: int, *, last: bool) -> list[Damage]:
        """Count pending records (headers only); in the last segment also check CRCs and cut a bad tail."""
        path = self._path(base)
        fh = self._open_segment(path, os.O_RDWR if last else os.O_RDONLY)
        data = fh.read() if last else b""
        size = len(data) if last else os.fstat(fh.fileno()).st_size
        pos = max(self.acked - base, 0)
        if pos > size:
            pos = size
        damage: list[Damage] = []  # only the last segment is reported here; read() reports the others
        with fh:
            while pos < size:
                if last:
                    head = data[pos:pos + _HEAD.size]
                else:
                    fh.seek(pos)
                    head = fh.read(_HEAD.size)
                reason = None
                if len(head) < _HEAD.size:
                    reason = "torn record header at the end of the spool"
                else:
                    length, events, crc = _HEAD.unpack(head)
                    end = pos + _HEAD.size + length
                    if end > size:
                        reason = "torn record at the end of the spool" if last else "record runs past its segment"
                    elif last and _crc(head[:8], data[pos + _HEAD.size:end]) != crc:
                        if _whole_record_at(data, end):  # corrupt, but good records follow: read() skips it alone
                            pos = end
                            continue
                        reason = "record failed its CRC check"
                if reason is not None:
                    if last:  # cut it off so new records append on a clean boundary
                        damage.append(Damage(path, pos, size - pos, reason, data[pos:pos + 4096]))
                        fh.truncate(pos)
                    break
                self.pending_events += events
                pos = end
        if last:
            self.write_pos = base + pos
        return damage

    @staticmethod
    def _open_segment(path: Path, flags: int) -> BinaryIO:
        """An existing segment, never through a symlink (a torn tail is cut: that must not reach another file)."""
        return os.fdopen(_open_file(path, flags, "spool segment"), "r+b" if flags & os.O_RDWR else "rb")

    def _lock(self) -> None:
        fd = _open_file(self.dir / "lock", os.O_RDWR | os.O_CREAT, "spool lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StageError(f"{self.dir}: spool is in use by another pipeline process") from None
        self._lock_fd = fd

    def _read_ack(self) -> None:
        path = self.dir / "ack"
        self._ack_fd = _open_file(path, os.O_RDWR | os.O_CREAT, "spool ack file")
        raw = os.pread(self._ack_fd, 2 * _ACK_SLOT, 0)
        best = (0, 0)
        for slot in (0, 1):
            chunk = raw[slot * _ACK_SLOT: slot * _ACK_SLOT + _ACK.size]
            if len(chunk) == _ACK.size:
                gen, off, crc = _ACK.unpack(chunk)
                if zlib.crc32(chunk[:16]) == crc and gen > best[0]:
                    best = (gen, off)
        self._gen, self.acked = best

    # --- append / read / ack -------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes written and not yet acknowledged (what `max_bytes` bounds)."""
        return self.write_pos - self.acked

    def append(self, payload: bytes, events: int) -> int:
        """Append one record; returns the offset where it ends (its ack position).

        A write the disk refuses (full, file size limit) raises a one-line StageError and leaves
        no part of the record behind: the segment is cut back to where the record began.
        """
        if self.write_pos - self._segments[-1] >= self.segment_bytes:
            self._rotate()
        rec = encode(payload, events)
        assert self._fd is not None
        self._check_there()
        view = memoryview(rec)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            with contextlib.suppress(OSError):  # a torn record would otherwise end the segment
                os.ftruncate(self._fd, self.write_pos - self._segments[-1])
            raise StageError(f"{self._path(self._segments[-1])}: cannot write: {exc.strerror or exc}") from None
        self.write_pos += len(rec)
        self.pending_events += events
        return self.write_pos

    def _check_there(self) -> None:
        """The segment we append to must still be the one its path names: a spool directory removed (or a
        segment replaced) while running took every record not yet delivered with it, and later appends went
        into a deleted file, to vanish at the next restart without a word."""
        path = self._path(self._segments[-1])
        assert self._fd is not None
        if not _names(path, self._fd):
            raise StageError(self._removed(path))

    def gone(self) -> str | None:
        """Why what is not yet delivered would not reach the next run (the spool removed or replaced since it was
        opened: the ack file, the segment appended to, or another segment still holding undelivered records)."""
        if self.pending_bytes <= 0 or self._fd is None or self._ack_fd is None:
            return None
        first = self._segments.index(self._segment_of(self.acked))
        for path, fd in ((self.dir / "ack", self._ack_fd), (self._path(self._segments[-1]), self._fd),
                         *((self._path(base), None) for base in self._segments[first:-1])):
            if not _names(path, fd):
                return self._removed(path)
        return None

    def _removed(self, path: Path) -> str:
        return (f"{path}: the spool was removed or replaced while running: its {self.pending_events} "
                "undelivered event(s) cannot be read back or survive a restart")

    def read(self) -> Record | Damage | None:
        """The record at the read position (advancing it), a damaged range skipped, or None at the end."""
        while self.read_pos < self.write_pos:
            base = self._segment_of(self.read_pos)
            fd = self._reader(base)
            pos = self.read_pos - base
            head = os.pread(fd, _HEAD.size, pos)
            seg_end = self._segment_end(base)
            if len(head) < _HEAD.size:
                return self._skip(base, pos, seg_end, "torn record header", head)
            length, events, crc = _HEAD.unpack(head)
            end = pos + _HEAD.size + length
            if base + end > seg_end or length > MAX_RECORD:
                return self._skip(base, pos, seg_end, "record runs past its segment", head)
            payload = os.pread(fd, length, pos + _HEAD.size)
            if len(payload) != length or _crc(head[:8], payload) != crc:
                return self._skip(base, pos, base + end, "record failed its CRC check", head + payload[:4096])
            self.read_pos = base + end
            self._out.append((self.read_pos, events))
            return Record(base + end, events, payload)
        return None

    def skip_to(self, end: int, events: int) -> None:
        """The record ending at `end` was handed out from memory: move the read position past it."""
        self.read_pos = max(self.read_pos, end)
        self._out.append((end, events))

    def ack(self, end: int) -> None:
        """Records up to `end` were delivered: persist the offset, delete segments left behind."""
        if end <= self.acked:
            return
        self.acked = end
        out = self._out
        while out and out[0][0] <= end:
            self.pending_events -= out.popleft()[1]
        self._gen += 1
        body = struct.pack("<QQ", self._gen, end)
        assert self._ack_fd is not None
        os.pwrite(self._ack_fd, body + struct.pack("<I", zlib.crc32(body)), (self._gen % 2) * _ACK_SLOT)
        while len(self._segments) > 1 and self._segments[1] <= end:
            base = self._segments.pop(0)
            self._close_reader(base)
            self._path(base).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in (self._fd, self._ack_fd, self._rfd[1] if self._rfd else None, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._ack_fd = self._rfd = self._lock_fd = None

    # --- segments --------------------------------------------------------------------------

    def _path(self, base: int) -> Path:
        return self.dir / f"{base:020d}{_SUFFIX}"

    def _open_append(self, base: int) -> None:
        fd = _open_file(self._path(base), os.O_WRONLY | os.O_CREAT | os.O_APPEND, "spool segment")
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.write_pos = base + os.fstat(fd).st_size

    def _rotate(self) -> None:
        base = self.write_pos
        self._open_append(base)  # may raise (disk full): the current segment then stays the last one
        self._segments.append(base)

    def _segment_of(self, offset: int) -> int:
        for base in reversed(self._segments):
            if base <= offset:
                return base
        return self._segments[0]

    def _segment_end(self, base: int) -> int:
        i = self._segments.index(base)
        return self._segments[i + 1] if i + 1 < len(self._segments) else self.write_pos

    def _reader(self, base: int) -> int:
        if self._rfd is not None and self._rfd[0] == base:
            return self._rfd[1]
        if self._rfd is not None:
            os.close(self._rfd[1])
        fd = _open_file(self._path(base), os.O_RDONLY, "spool segment")  # a one-line StageError if refused
        self._rfd = (base, fd)
        return fd

    def _close_reader(self, base: int) -> None:
        if self._rfd is not None and self._rfd[0] == base:
            os.close(self._rfd[1])
            self._rfd = None

    def _skip(self, base: int, pos: int, upto: int, reason: str, raw: bytes) -> Damage:
        """Move the read position past a damaged range (to the next segment when the length is garbage)."""
        self.read_pos = upto
        self._out.append((upto, 0))
        return Damage(self._path(base), pos, upto - base - pos, reason, raw[:4096])

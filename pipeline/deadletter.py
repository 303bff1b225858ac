"""The dead-letter file: every input we could not process, with why and where from."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import reprlib
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import PipelineError, StageError
from pipeline.events import iso_ts
from pipeline.files import check_writable, open_private, still_names

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 12, 64, 64, 2048, 256
REPR_CHARS = 16384


def encode(rec: dict[str, Any]) -> bytes:
    """`rec` as one JSON line; an event JSON cannot hold (too deep, odd keys) is kept as `event_repr`."""
    try:
        return orjson.dumps(rec, default=str) + b"\n"
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        rec = dict(rec)
        rec["reason"] = f"{rec.get('reason', '')} (event not JSON-serialisable: {exc}; kept as event_repr)"
        rec["event_repr"] = _REPR.repr(rec.pop("event", None))[:REPR_CHARS]
        try:
            return orjson.dumps(rec, default=str) + b"\n"
        except (TypeError, ValueError):
            return orjson.dumps({k: str(v)[:REPR_CHARS] for k, v in rec.items()}) + b"\n"

MAX_REASONS = 32  # distinct reason kinds kept for metrics; more are counted as "other"
_NUMBERS = re.compile(r"\d+")
DEFAULT_MAX_BYTES = 1 << 30  # the top-level `dead_letter_max_bytes`: a flood of rejects cannot fill the disk
MIN_MAX_BYTES = 1 << 20  # the least a config may set
WARN_EVERY = 60.0  # seconds between two "file full" warnings

log = logging.getLogger("pipeline.deadletter")


def size_text(n: int) -> str:
    """`1 GiB`, `3 MiB`, `1500 bytes`: a size as a config would say it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def reason_kind(reason: str) -> str:
    """A short, bounded label for a reason: the part before the first colon, numbers as N."""
    head = reason.split(":", 1)[0].strip()
    return _NUMBERS.sub("N", head)[:60] or "unknown"


def _count(by_reason: Counter[str], reason: str) -> None:
    """One more of `reason`'s kind, at most MAX_REASONS kinds (then "other")."""
    kind = reason_kind(reason)
    if kind not in by_reason and len(by_reason) >= MAX_REASONS:
        kind = "other"
    by_reason[kind] += 1


class DeadLetter:
    """Append-only JSONL of rejected inputs; opened on first use, thread-safe.

    Each line: `{"ts", "reason", "origin", "stage", "event"| "raw"}`. A regular file grows to `max_bytes` at
    most: a reject that does not fit is counted in `full` and not written, and the run goes on.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.count = 0
        self.lost = 0  # events that should have been written here and could not be (the file unwritable)
        self.failure: str | None = None  # why, the first time
        self.by_reason: Counter[str] = Counter()  # reason_kind -> count, for /metrics
        self.full = 0  # rejects not written: the file had reached max_bytes (each counted here only)
        self.full_by_reason: Counter[str] = Counter()
        self._warned: float | None = None  # time.monotonic() of the last "file full" warning
        self._fh: Any = None
        self._lock = threading.Lock()

    @property
    def full_reason(self) -> str:
        """Why rejects were not written, for the summary and the exit error."""
        return f"{self.path} reached dead_letter_max_bytes ({size_text(self.max_bytes)})"

    def unkept(self) -> str | None:
        """Why a run that otherwise ended well must not exit 0: events LOST (the file could not be written), or
        rejects left out because the file was full; None if every reject is in the file."""
        if self.lost:
            return f"{self.failure}; {self.lost} event(s) lost"
        if self.full:
            return f"{self.full} reject(s) not dead-lettered: {self.full_reason}"
        return None

    def summary_lines(self) -> list[str]:
        """The exit summary's `LOST N` and `NOT DEAD-LETTERED N` lines (none when nothing was left out)."""
        lines = []
        if self.lost:
            lines.append(f"LOST {self.lost} event(s) that could not be dead-lettered ({self.failure})")
        if self.full:
            lines.append(f"NOT DEAD-LETTERED {self.full} reject(s): {self.full_reason}; rotate or remove it to make "
                         "room")
        return lines

    def check(self) -> None:
        """At start: fail now (StageError) if the file could not be opened, rather than at the first reject."""
        try:
            check_writable(self.path)
        except StageError as exc:  # (it named only a directory, not which of the config's files it was for)
            raise StageError(f"{self.path}: cannot write the dead-letter file: {exc}") from None
        with contextlib.suppress(OSError):
            st = os.stat(self.path, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size >= self.max_bytes:  # left by an earlier run
                log.warning("%s: already %d bytes, dead_letter_max_bytes is %s: rejects will not be written "
                            "until it is rotated or removed", self.path, st.st_size, size_text(self.max_bytes))
                self._warned = time.monotonic()

    def write(self, reason: str, *, stage: str, origin: Any = None,
              event: Any = None, raw: bytes | str | None = None, **extra: Any) -> bool:
        """Append one reject; False when the file was full (counted in `full`). StageError: cannot be written."""
        now = time.time()
        rec: dict[str, Any] = {"ts": iso_ts(now), "unix_ts": round(now, 3), "stage": stage, "reason": reason}
        if origin is not None:
            rec["origin"] = origin
        rec.update(extra)
        if event is not None:
            rec["event"] = event
        if raw is not None:
            rec["raw"] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = encode(rec)
        with self._lock:
            try:
                written = self._append(line)
            except (OSError, PipelineError) as exc:
                self.lost += 1
                why = str(exc) if isinstance(exc, PipelineError) else exc.strerror or str(exc)
                msg = f"{self.path}: cannot write the dead-letter file: {why}"
                self.failure = self.failure or msg
                raise StageError(msg) from None
            if written:
                self.count += 1
                _count(self.by_reason, reason)
            else:
                self.full += 1
                _count(self.full_by_reason, reason)
                self._warn_full()
            return written

    def _warn_full(self) -> None:
        now = time.monotonic()
        if self._warned is None or now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("%s: %d reject(s) not written so far; rotate or remove it to make room", self.full_reason,
                        self.full)

    def _append(self, line: bytes) -> bool:
        """Write one whole line (a short write is continued); after a failure the file is opened again next time,
        which first ends a partial line. False: not written, the file would grow past max_bytes (its size now,
        so other writers and a truncation count; a device or pipe fills no disk and has no bound)."""
        if self._fh is not None and not still_names(self.path, self._fh):  # deleted or rotated under us
            self._fh.close()
            self._fh = None
        if self._fh is None:
            self._fh = open_private(self.path)
        st = os.fstat(self._fh.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size + len(line) > self.max_bytes:
            return False
        view = memoryview(line)
        try:
            while view:
                view = view[self._fh.write(view) or 0:]
        except OSError:
            if len(view) < len(line):  # the disk took part of the line: take it back, so every line stays whole
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fh.fileno(), os.fstat(self._fh.fileno()).st_size - (len(line) - len(view)))
            self._fh.close()
            self._fh = None
            raise
        return True

    def lose(self, n: int) -> None:
        """`n` more events could not be written here (a caller gave up after a failed write)."""
        self.lost += n

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

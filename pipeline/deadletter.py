"""The dead-letter file: every input we could not process, with why and where from."""

from __future__ import annotations

import contextlib
import os
import re
import reprlib
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


def reason_kind(reason: str) -> str:
    """A short, bounded label for a reason: the part before the first colon, numbers as N."""
    head = reason.split(":", 1)[0].strip()
    return _NUMBERS.sub("N", head)[:60] or "unknown"


class DeadLetter:
    """Append-only JSONL of rejected inputs; opened on first use, thread-safe.

    Each line: `{"ts", "reason", "origin", "stage", "event"| "raw"}`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self.lost = 0  # events that should have been written here and could not be (the file unwritable)
        self.failure: str | None = None  # why, the first time
        self.by_reason: Counter[str] = Counter()  # reason_kind -> count, for /metrics
        self._fh: Any = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """At start: fail now (StageError) if the file could not be opened, rather than at the first reject."""
        try:
            check_writable(self.path)
        except StageError as exc:  # (it named only a directory, not which of the config's files it was for)
            raise StageError(f"{self.path}: cannot write the dead-letter file: {exc}") from None

    def write(self, reason: str, *, stage: str, origin: Any = None,
              event: Any = None, raw: bytes | str | None = None, **extra: Any) -> None:
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
                self._append(line)
            except (OSError, PipelineError) as exc:
                self.lost += 1
                why = str(exc) if isinstance(exc, PipelineError) else exc.strerror or str(exc)
                msg = f"{self.path}: cannot write the dead-letter file: {why}"
                self.failure = self.failure or msg
                raise StageError(msg) from None
            self.count += 1
            kind = reason_kind(reason)
            if kind not in self.by_reason and len(self.by_reason) >= MAX_REASONS:
                kind = "other"
            self.by_reason[kind] += 1

    def _append(self, line: bytes) -> None:
        """Write one whole line (a short write is continued); after a failure the file is opened again next time,
        which first ends a partial line."""
        if self._fh is not None and not still_names(self.path, self._fh):  # deleted or rotated under us
            self._fh.close()
            self._fh = None
        if self._fh is None:
            self._fh = open_private(self.path)
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

    def lose(self, n: int) -> None:
        """`n` more events could not be written here (a caller gave up after a failed write)."""
        self.lost += n

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

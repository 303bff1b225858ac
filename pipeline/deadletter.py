"""The dead-letter file: every input we could not process, with why and where from."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline.events import iso_ts
from pipeline.files import open_private


class DeadLetter:
    """Append-only JSONL of rejected inputs; opened on first use, thread-safe.

    Each line: `{"ts", "reason", "origin", "stage", "event"| "raw"}`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._fh: Any = None
        self._lock = threading.Lock()

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
        line = orjson.dumps(rec, default=str) + b"\n"
        with self._lock:
            if self._fh is None:
                self._fh = open_private(self.path)
            self._fh.write(line)
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

"""Where API-managed capture sessions persist: one 0600 JSON file per session under `<state_dir>/sessions/`.

A file per session keeps each write small (a status change of one session never
rewrites the others) and atomic (`write_private_text` renames a temporary
file), so a crash leaves every record either old or new, never torn.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.errors import StageError
from pipeline.files import ensure_private_dir, write_private_text

log = logging.getLogger("pipeline.controller.sessions")

SESSIONS_DIR: Final = "sessions"
MAX_RECORD_BYTES: Final = 1 << 20
_SAFE_ID: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def safe_id(session_id: str) -> bool:
    """True when `session_id` can name a file (it comes from VideoDB: never let it pick a directory)."""
    return bool(_SAFE_ID.match(session_id)) and ".." not in session_id


class SessionStore:
    """Reads and writes session records; a failed write is logged, never fatal (the session goes on)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / SESSIONS_DIR

    def path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def save(self, record: dict[str, Any]) -> None:
        sid = str(record.get("session_id") or "")
        if not safe_id(sid):
            log.error("sessions: not saving a session with id %r (not a safe file name)", sid[:80])
            return
        try:
            write_private_text(self.path(sid), orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
        except (StageError, OSError) as exc:
            log.error("sessions: cannot save %s: %s", self.path(sid), exc)

    def write_json(self, name: str, data: Any) -> None:
        """Another state file beside the records (e.g. where a restart's backfill starts)."""
        try:
            write_private_text(self.dir / name, orjson.dumps(data).decode())
        except (StageError, OSError) as exc:
            log.error("sessions: cannot save %s: %s", self.dir / name, exc)

    def read_json(self, name: str) -> Any:
        """What `write_json` saved, or None (missing, unreadable, symlinked or over 16 MiB)."""
        p = self.dir / name
        try:
            if p.is_symlink() or p.stat().st_size > 16 * MAX_RECORD_BYTES:
                return None
            return orjson.loads(p.read_bytes())
        except (OSError, ValueError):
            return None

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable record; unreadable ones are logged and skipped (and left for a person to see)."""
        if not self.dir.exists():
            return []
        ensure_private_dir(self.dir)
        out = []
        for p in sorted(self.dir.glob("*.json")):
            record = self._read(p)
            if record is not None:
                out.append(record)
        return out

    def load(self, session_id: str) -> dict[str, Any] | None:
        """One saved record, or None (no such file, or unreadable: logged)."""
        return self._read(self.path(session_id)) if safe_id(session_id) else None

    @staticmethod
    def _read(p: Path) -> dict[str, Any] | None:
        try:
            if p.is_symlink() or p.stat().st_size > MAX_RECORD_BYTES:
                raise ValueError("symlink or larger than 1 MiB")
            record = orjson.loads(p.read_bytes())
            if not isinstance(record, dict) or record.get("session_id") != p.stem:
                raise ValueError("not a session record")
        except (OSError, ValueError) as exc:
            log.warning("sessions: skipping %s: %s", p, exc)
            return None
        return record

    def clean_temporaries(self) -> None:
        """Remove `.<id>.json.<pid>.tmp` files a crash left behind."""
        if self.dir.exists():
            for p in self.dir.glob(".*.tmp"):
                try:
                    os.unlink(p)
                except OSError:
                    pass

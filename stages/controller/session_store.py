"""Where API-managed capture sessions persist: one 0600 JSON file per session under `<state_dir>/sessions/`.

A file per session keeps each write small (a status change of one session never
rewrites the others) and atomic (`write_private_text` renames a temporary
file), so a crash leaves every record either old or new, never torn.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.errors import StageError
from pipeline.events import iso_seconds
from pipeline.files import ensure_private_dir, write_private_text

log = logging.getLogger("pipeline.controller.sessions")

SESSIONS_DIR: Final = "sessions"
#: A record is its request's metadata (at most api.max_body_bytes, 16 MiB) plus about a kilobyte.
MAX_RECORD_BYTES: Final = 32 << 20
MAX_STATE_BYTES: Final = 16 << 20  # another state file (the backfill checkpoint)
INTENT_SWEEP_EVERY: Final = 3600.0  # seconds between two looks for create intents whose client token expired
_SAFE_ID: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")  # \Z: `$` lets a final newline through
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
#: The type of each record key a restart reads (a key may also be missing or null).
_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "status": str, "end_user_id": str, "collection_id": str, "metadata": dict, "created_at": str,
    "expires_at": str, "client_token": str, "ws_connection_id": str, "stop_requested": bool, "stop_incomplete": bool,
    "stored": bool, "idempotency_key": str, "request_hash": str, "on_active": dict, "rtstreams": list,
    "indexes": list, "session_id": str, "backfill_from": dict, "earlier_tokens": list}


def safe_id(session_id: str) -> bool:
    """True when `session_id` can name a file (it comes from VideoDB: never let it pick a directory)."""
    return bool(_SAFE_ID.match(session_id)) and ".." not in session_id


class SessionStore:
    """Reads and writes session records; a failed write is logged, never fatal (the session goes on)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / SESSIONS_DIR
        self._swept = -INTENT_SWEEP_EVERY  # monotonic time of the last look for expired intents
        #: records whose last save failed (the session's own dict, so always its latest state), by id: written
        #: again at the next save that works. Else a session made while the disk was full (or the directory
        #: gone) had no file until its status next changed, for ever if it did not, and a restart lost it
        self._unsaved: dict[str, dict[str, Any]] = {}

    def path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def save(self, record: dict[str, Any]) -> bool:
        """Write the record; False (logged) when it could not be."""
        sid = str(record.get("session_id") or "")
        if not safe_id(sid):
            log.error("sessions: not saving a session with id %r (not a safe file name)", sid[:80])
            return False
        try:  # compact: indented, a deep metadata list grew 40-fold, past what a restart reads back
            self._write(sid, record)
        except (StageError, OSError) as exc:
            log.error("sessions: cannot save %s: %s", self.path(sid), exc)
            self._unsaved[sid] = record
            return False
        self._unsaved.pop(sid, None)
        self._save_unsaved()
        return True

    def _write(self, sid: str, record: dict[str, Any]) -> None:
        write_private_text(self.path(sid), orjson.dumps(record).decode())

    def _save_unsaved(self) -> None:
        """The disk took a write again: the records it refused before, each logged once already."""
        for sid, record in list(self._unsaved.items()):
            try:
                self._write(sid, record)
            except (StageError, OSError):
                return
            self._unsaved.pop(sid, None)

    def write_json(self, name: str, data: Any) -> None:
        """Another state file beside the records (e.g. where a restart's backfill starts)."""
        try:
            write_private_text(self.dir / name, orjson.dumps(data).decode())
        except (StageError, OSError) as exc:
            log.error("sessions: cannot save %s: %s", self.dir / name, exc)
            return
        self._save_unsaved()  # written every few seconds while events flow

    def read_json(self, name: str) -> Any:
        """What `write_json` saved, or None (missing, unreadable, not a regular file or over 16 MiB)."""
        try:
            return orjson.loads(read_regular(self.dir / name, MAX_STATE_BYTES))
        except (OSError, ValueError):
            return None

    def intent_path(self, key: str) -> Path:
        """Where a keyed create notes what it asks VideoDB for, until its record is saved (the key may hold '/')."""
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.creating"

    def save_intent(self, intent: dict[str, Any]) -> bool:
        """Note a keyed create before it asks VideoDB; False (logged) when the note could not be written."""
        self.drop_expired_intents()
        try:
            write_private_text(self.intent_path(intent["idempotency_key"]), orjson.dumps(intent).decode())
        except (StageError, OSError) as exc:
            log.error("sessions: cannot save %s: %s; the create is refused (503) until it can be",
                      self.intent_path(intent["idempotency_key"]), exc)
            return False
        return True

    def load_intent(self, key: str) -> dict[str, Any] | None:
        """The create noted for `key` that never got its record, or None."""
        try:
            intent = orjson.loads(read_regular(self.intent_path(key), MAX_RECORD_BYTES))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("sessions: skipping %s: %s", self.intent_path(key), exc)
            return None
        ok = isinstance(intent, dict) and intent.get("idempotency_key") == key and wrong_key(intent) is None
        if ok and _expired(intent, time.time()):
            self.drop_intent(key)
            return None
        return intent if ok else None

    def drop_expired_intents(self, *, now: bool = False) -> None:
        """Remove the create intents whose client token has expired (at most once per INTENT_SWEEP_EVERY unless
        `now`). A retry could not use the session such an intent would find (its desktop client can no longer
        start it: a new one is made instead), so without this they piled up, one for every keyed create that
        failed in a way worth a retry that never came."""
        if not now and time.monotonic() - self._swept < INTENT_SWEEP_EVERY:
            return
        self._swept, wall = time.monotonic(), time.time()
        for p in self.dir.glob("*.creating") if self.dir.exists() else ():
            try:
                intent = orjson.loads(read_regular(p, MAX_RECORD_BYTES))
            except (OSError, ValueError):
                continue  # unreadable: left for a person to see, as when a retry reads it
            if isinstance(intent, dict) and _expired(intent, wall):
                _remove(p)

    def drop_intent(self, key: str) -> None:
        _remove(self.intent_path(key))

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable record, oldest created first (so the newest are the ones kept in memory); unreadable
        ones are logged and skipped (and left for a person to see)."""
        if not self.dir.exists():
            return []
        ensure_private_dir(self.dir)
        out = []
        for p in sorted(self.dir.glob("*.json")):
            record = self._read(p)
            if record is not None:
                out.append(record)
        out.sort(key=lambda r: str(r.get("created_at") or ""))  # stable: the file name breaks ties
        return out

    def drop(self, session_id: str) -> None:
        """Remove a finished session's record (nothing will ask for it again); a failure is logged."""
        self._unsaved.pop(session_id, None)
        if safe_id(session_id):
            _remove(self.path(session_id))

    def load(self, session_id: str) -> dict[str, Any] | None:
        """One saved record, or None (no such file, or unreadable: logged)."""
        return self._read(self.path(session_id)) if safe_id(session_id) else None

    @staticmethod
    def _read(p: Path) -> dict[str, Any] | None:
        try:
            record = orjson.loads(read_regular(p, MAX_RECORD_BYTES))
            if not isinstance(record, dict) or record.get("session_id") != p.stem:
                raise ValueError("not a session record")
            if (wrong := wrong_key(record)) is not None:
                raise ValueError(f"not a session record ({wrong})")
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


def _remove(path: Path) -> None:
    """Remove a record or intent file; one already gone is fine, another failure is logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("sessions: cannot remove %s: %s", path, exc)


def _expired(intent: dict[str, Any], now: float) -> bool:
    """Has the client token an intent noted expired? (Without a readable `expires_at`: no.)"""
    expires = iso_seconds(intent.get("expires_at"))
    return expires is not None and expires < now


def read_regular(p: Path, limit: int) -> bytes:
    """The bytes of `p` if it is a regular file of at most `limit` bytes (a FIFO would block, a symlink may
    point anywhere): ValueError otherwise."""
    if p.is_symlink():
        raise ValueError("a symlink")
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"larger than {limit >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit >> 20} MiB")
    return data


def wrong_key(record: dict[str, Any]) -> str | None:
    """The first record key of the wrong type, as 'key: expected type' (a damaged or foreign file), or None.

    Shared by the session API's records and the single session's capture_session.json."""
    for key, kind in _TYPES.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            return f"{key}: expected {getattr(kind, '__name__', kind)}"
    for r in record.get("rtstreams") or []:
        if not (isinstance(r, dict) and isinstance(r.get("rtstream_id"), str)
                and isinstance(r.get("media_types", []), list) and isinstance(r.get("name", ""), str)):
            return "rtstreams: expected objects with an rtstream_id"
    for i in record.get("indexes") or []:
        if not (isinstance(i, dict) and isinstance(i.get("index_id"), str) and isinstance(i.get("rtstream_id"), str)):
            return "indexes: expected objects with an index_id and an rtstream_id"
    return None

"""Where API-managed capture sessions persist: one 0600 JSON file per session under `<state_dir>/sessions/`.

A file per session keeps each write small (a status change of one session never
rewrites the others) and atomic (`write_private_bytes` renames a temporary
file), so a crash leaves every record either old or new, never torn. Every file
here is written and removed by one thread, in order (`store_writer.py`): the
event loop only serializes; reads see the writes still queued.

The directory removed (`rm -rf` of it or of the state_dir) or replaced while running: a later write made it
again, but the records not saved since were gone, and a restart knew nothing of those sessions. The writer
thread notices (the directory it writes into is not the one it wrote into before: missing, or another
inode), at a write or at `check()`, and calls `on_lost`, which saves every record held in memory again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.errors import StageError
from pipeline.events import iso_seconds
from pipeline.files import ensure_private_dir, write_private_bytes
from pipeline.stale import remove_stale
from stages.controller.store_writer import JOB, UNKNOWN, StoreWriter

log = logging.getLogger("pipeline.controller.sessions")

SESSIONS_DIR: Final = "sessions"
#: A record is its request's metadata (at most api.max_body_bytes, 16 MiB) plus about a kilobyte.
MAX_RECORD_BYTES: Final = 32 << 20
MAX_STATE_BYTES: Final = 16 << 20  # another state file (the backfill checkpoint)
FLUSH_WAIT: Final = 10.0  # seconds a stop waits for the queued writes
INTENT_SWEEP_EVERY: Final = 3600.0  # seconds between two looks for create intents whose client token expired
_SAFE_ID: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")  # \Z: `$` lets a final newline through
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
SWEEP: Final = f"{JOB}sweep"  # the writer thread's job removing expired intent notes
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
    """Reads and writes session records; a failed write is logged, never fatal (the session goes on).

    `save`, `drop`, `write_json` and the intent notes are queued for the writer thread (see store_writer.py);
    `flushed(session_id)` waits for a record to be on disk, `close()` for every queued write (a stop)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / SESSIONS_DIR
        self._swept = -INTENT_SWEEP_EVERY  # monotonic time of the last look for expired intents
        #: records whose last write failed (their newest version) are kept there, written again after the next
        #: write that works. Else a session made while the disk was full (or the directory gone) had no file
        #: until its status next changed, for ever if it did not, and a restart lost it
        self._writer = StoreWriter(self._write, self._remove_file, lambda name: str(self.dir / name))
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the directory written into (writer thread)
        #: called in the writer thread when the directory was removed or replaced since the last write
        self.on_lost: Callable[[], object] | None = None

    def path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def save(self, record: dict[str, Any], *, then: Callable[[], None] | None = None) -> bool:
        """Queue writing the record as it is now; False (logged) when its id cannot name a file. `then` runs in
        the writer thread once the record is on disk (not if its write fails; then after it finally works)."""
        sid = str(record.get("session_id") or "")
        if not safe_id(sid):
            log.error("sessions: not saving a session with id %r (not a safe file name)", sid[:80])
            return False
        # compact: indented, a deep metadata list grew 40-fold, past what a restart reads back
        self._writer.put(f"{sid}.json", orjson.dumps(record), then=then)
        return True

    def flushed(self, session_id: str) -> asyncio.Future[bool]:
        """Resolves once the record as saved so far is on disk (True) or could not be written (False, logged)."""
        return self._writer.flushed(f"{session_id}.json")

    def flush(self, timeout: float = FLUSH_WAIT) -> bool:
        """Block until every queued write is done (False after `timeout` seconds): for callers without a loop."""
        return self._writer.idle(timeout)

    async def close(self, timeout: float = FLUSH_WAIT) -> None:
        """A stop: the queued writes are written, for `timeout` seconds at most (what is left is logged)."""
        await self._writer.close(timeout)

    def has(self, session_id: str) -> bool:
        """Is there a record of this session (on disk, or queued)?"""
        queued = self._writer.peek(f"{session_id}.json")
        return self.path(session_id).exists() if queued is UNKNOWN else queued is not None

    def _write(self, name: str, data: bytes) -> None:
        lost = self._changed()
        write_private_bytes(self.dir / name, data)
        self._ident = _ident(self.dir)
        if lost:
            self._lost()

    def check(self) -> None:
        """Queue a look at whether the directory was removed or replaced (when nothing is written for a while)."""
        self._writer.run(f"{JOB}check", self._check)

    def _check(self) -> None:
        if not self._changed():
            return
        try:
            ensure_private_dir(self.dir)
        except StageError:
            return  # cannot be made yet (the next look, or a write, tries again; a write logs why)
        self._ident = _ident(self.dir)
        self._lost()

    def _changed(self) -> bool:
        """Is the directory not the one written into before (removed, or replaced)?"""
        return self._ident is not None and _ident(self.dir) != self._ident

    def _lost(self) -> None:
        if self.on_lost is not None:
            try:
                self.on_lost()
            except RuntimeError:  # the loop has closed: nothing to save any more
                pass

    def _remove_file(self, name: str) -> None:
        _remove(self.dir / name)

    def _bytes(self, p: Path, limit: int) -> bytes:
        """The file's bytes as queued (newest) or on disk; FileNotFoundError when it is (being) removed."""
        queued = self._writer.peek(p.name)
        if queued is UNKNOWN:
            return read_regular(p, limit)
        if queued is None:
            raise FileNotFoundError(p)
        assert isinstance(queued, bytes)
        return queued

    def write_json(self, name: str, data: Any) -> None:
        """Another state file beside the records (e.g. where a restart's backfill starts), queued as records are."""
        self._writer.put(name, orjson.dumps(data))

    def read_json(self, name: str) -> Any:
        """What `write_json` saved, or None (missing, unreadable, not a regular file or over 16 MiB)."""
        try:
            return orjson.loads(self._bytes(self.dir / name, MAX_STATE_BYTES))
        except (OSError, ValueError):
            return None

    def intent_path(self, key: str) -> Path:
        """Where a keyed create notes what it asks VideoDB for, until its record is saved (the key may hold '/')."""
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.creating"

    async def save_intent(self, intent: dict[str, Any]) -> bool:
        """Note a keyed create before it asks VideoDB (True once on disk); False (logged) when the note could not
        be written (not tried again: the create is refused)."""
        self.drop_expired_intents()  # queued first, though the awaited note may go ahead: a new note never expired
        name = self.intent_path(intent["idempotency_key"]).name
        self._writer.put(name, orjson.dumps(intent), keep=False)
        if await self._writer.flushed(name):
            return True
        log.error("sessions: the create is refused (503) until %s can be written", self.dir / name)
        return False

    def load_intent(self, key: str) -> dict[str, Any] | None:
        """The create noted for `key` that never got its record, or None."""
        try:
            intent = orjson.loads(self._bytes(self.intent_path(key), MAX_RECORD_BYTES))
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

    def drop_expired_intents(self, *, now: bool = False) -> asyncio.Future[bool] | None:
        """Queue removing the create intents whose client token has expired (at most once per INTENT_SWEEP_EVERY
        unless `now`); the future resolves once that is done. A retry could not use the session such an intent
        would find (its desktop client can no longer start it: a new one is made instead), so without this they
        piled up, one for every keyed create that failed in a way worth a retry that never came.

        The look runs in the writer thread, the only one writing here: before, it ran on the event loop (its
        reads of notes up to 16 MiB held every request) and could remove a retry's new note for the same key,
        written by that thread between the look's read of the expired one and its removal (a crash before the
        record was saved, and the next retry made a second session)."""
        if not now and time.monotonic() - self._swept < INTENT_SWEEP_EVERY:
            return None
        self._swept = time.monotonic()
        self._writer.run(SWEEP, self._sweep)
        return self._writer.flushed(SWEEP) if now else None

    def _sweep(self) -> None:
        wall = time.time()
        for p in self.dir.glob("*.creating") if self.dir.exists() else ():
            try:
                intent = orjson.loads(read_regular(p, MAX_RECORD_BYTES))
            except (OSError, ValueError):
                continue  # unreadable: left for a person to see, as when a retry reads it
            # a version queued meanwhile (a retry's new note) is written after this, whatever is done here
            if isinstance(intent, dict) and _expired(intent, wall) and self._writer.peek(p.name) is UNKNOWN:
                _remove(p)

    def drop_intent(self, key: str) -> None:
        """Queued: after the writes already queued (the record a create saved before it drops its note)."""
        self._writer.put(self.intent_path(key).name, None)

    def load_all(self) -> list[dict[str, Any]]:
        """Every readable record, oldest created first (so the newest are the ones kept in memory); unreadable
        ones are logged and skipped (and left for a person to see)."""
        names = {n for n in self._writer.queued() if n.endswith(".json")}  # reads see the writes still queued
        if self.dir.exists():
            ensure_private_dir(self.dir)
            self._ident = self._ident or _ident(self.dir)
            names.update(p.name for p in self.dir.glob("*.json"))
        out = []
        for name in sorted(names):
            record = self._read(self.dir / name)
            if record is not None:
                out.append(record)
        out.sort(key=lambda r: str(r.get("created_at") or ""))  # stable: the file name breaks ties
        return out

    def drop(self, session_id: str) -> None:
        """Remove a finished session's record (nothing will ask for it again), after its writes queued before (a
        write queued after it would bring it back); a failure is logged."""
        if safe_id(session_id):
            self._writer.put(f"{session_id}.json", None)

    def load(self, session_id: str) -> dict[str, Any] | None:
        """One saved record, or None (no such file, or unreadable: logged)."""
        return self._read(self.path(session_id)) if safe_id(session_id) else None

    def _read(self, p: Path) -> dict[str, Any] | None:
        try:
            record = orjson.loads(self._bytes(p, MAX_RECORD_BYTES))
            if not isinstance(record, dict) or record.get("session_id") != p.stem:
                raise ValueError("not a session record")
            if (wrong := wrong_key(record)) is not None:
                raise ValueError(f"not a session record ({wrong})")
        except FileNotFoundError:
            return None  # removed meanwhile (or queued to be)
        except (OSError, ValueError) as exc:
            log.warning("sessions: skipping %s: %s", p, exc)
            return None
        return record

    def clean_temporaries(self) -> None:
        """Remove `.<id>.json.<pid>.tmp` files a crash left behind (not one a live writer is at)."""
        remove_stale(self.dir)


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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

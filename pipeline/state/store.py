"""Stage state (`context.state.get(name)`) persisted in `<state_dir>/state.db` with stdlib sqlite3.

The hot path keeps plain dicts: `get(name)` returns a `TrackedDict`, a dict
whose reads are the built-in ones and whose writes also note the key. After
each batch that changed something, the local runtime calls `flush()`, which
writes just the noted keys in one sqlite transaction (WAL, synchronous=NORMAL:
a `kill -9` loses nothing flushed; a power cut may lose the last flushes).
So the cost is per batch and per changed key, never per event read.

Values must be JSON-serialisable, and a change must be an assignment
(`d[k] = v`): an in-place change such as `d[k].append(x)` is not seen.

A `state.db` that cannot be read (torn, corrupt, not a database) is renamed
to `state.db.corrupt-<unix time>` with one warning line, and the run starts
with empty state: forgetting cooldowns may repeat a few alerts, which beats
not running at all.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.api import StateStore
from pipeline.errors import StageError
from pipeline.events import Batch
from pipeline.files import FILE_MODE, ensure_private_dir
from pipeline.state.outbox import OUTBOX, Outbox

log = logging.getLogger("pipeline.state")

DB_FILE = "state.db"
_SCHEMA = "CREATE TABLE IF NOT EXISTS state (map TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, " \
          "PRIMARY KEY (map, key)) WITHOUT ROWID"


class TrackedDict(dict[Any, Any]):
    """A dict that remembers which keys were assigned or deleted since the last flush."""

    __slots__ = ("changed",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set[Any] = set()

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self.changed.add(key)

    def __delitem__(self, key: Any) -> None:
        dict.__delitem__(self, key)
        self.changed.add(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            self.changed.add(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[Any, Any]:
        key, value = dict.popitem(self)
        self.changed.add(key)
        return key, value

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> TrackedDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        self.changed.update(self.keys())
        dict.clear(self)


class SqliteStateStore(StateStore):
    """Named tracked dicts loaded from, and flushed to, one sqlite file."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.path = state_dir / DB_FILE
        self.flushes = 0
        self.rows_written = 0
        self._tracked: dict[str, TrackedDict] = {}
        self._last_error = ""
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the state.db we opened
        self._rewrite = False  # the next flush replaces every row (state.db was re-created)
        ensure_private_dir(state_dir)
        try:
            self._db, self._loaded = self._open()
        except sqlite3.DatabaseError as exc:
            self._set_aside(exc)
            self._db, self._loaded = self._open()
        self._outbox = Outbox(self.get(OUTBOX))

    # --- open / load ------------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, dict[str, dict[Any, Any]]]:
        if self.path.is_symlink():
            raise StageError(f"{self.path}: refusing a symlinked state file")
        try:
            # O_NONBLOCK: a FIFO there must not block the event loop (sqlite then refuses it as not a database)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK,
                         FILE_MODE)
            st = os.fstat(fd)
            os.close(fd)
            self._ident = (st.st_dev, st.st_ino)
            # timeout: a writer lock held elsewhere fails this flush at once; the next batch retries
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0.05)
        except (OSError, sqlite3.OperationalError) as exc:
            raise StageError(f"{self.path}: cannot open the state file: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            loaded = self._load(db.execute("SELECT map, key, value FROM state"))
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db, loaded

    def _load(self, rows: Iterable[tuple[str, str, bytes]]) -> dict[str, dict[Any, Any]]:
        out: dict[str, dict[Any, Any]] = {}
        bad = 0
        for name, key, value in rows:
            try:
                out.setdefault(name, {})[orjson.loads(key)] = orjson.loads(value)
            except (orjson.JSONDecodeError, TypeError):
                bad += 1
        if bad:
            log.warning("%s: skipped %d unreadable state entr%s", self.path, bad, "y" if bad == 1 else "ies")
        return out

    def _set_aside(self, exc: Exception) -> None:
        """Move an unreadable state file out of the way (kept for inspection) and start empty."""
        aside = self.path.with_name(f"{DB_FILE}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists() and not src.is_symlink():
                try:
                    os.replace(src, f"{aside}{suffix}")
                except OSError as err:
                    raise StageError(f"{src}: unreadable state file ({exc}) and cannot move it aside: "
                                     f"{err.strerror or err}") from None
        log.warning("%s: unreadable state (%s); moved it to %s and starting with empty rule/enrich state",
                    self.path, exc, aside.name)

    # --- the StateStore interface -----------------------------------------------------------------

    def get(self, name: str) -> MutableMapping[str, Any]:
        m = self._tracked.get(name)
        if m is None:
            m = TrackedDict(self._loaded.pop(name, {}))
            self._tracked[name] = self._maps[name] = m
        return m

    def unclaimed(self) -> list[str]:
        return sorted(self._loaded)

    def note(self, events: Batch) -> None:
        self._outbox.note(events)

    def hold(self, out: Batch, batch: int) -> None:
        self._outbox.hold(out, batch)

    def delivered(self, upto: int) -> bool:
        return self._outbox.delivered(upto)

    def lowest_held(self) -> int | None:
        return self._outbox.lowest

    def holds(self, batch: int) -> bool:
        return batch in self._outbox.batches

    def undelivered(self, batch: int) -> Batch:
        return self._outbox.undelivered(batch)

    @property
    def dirty(self) -> bool:
        return any(m.changed for m in self._tracked.values())

    def flush(self) -> None:
        """Write every changed key in one transaction; on failure keep them for the next flush."""
        if not self.dirty:
            return
        if not self._still_there():
            try:
                self._recreate()
            except StageError as exc:  # `rm -rf` of state_dir still under way, say: the next flush tries again
                self._failed(str(exc))
                return
        upserts: list[tuple[str, str, bytes]] = []
        deletes: list[tuple[str, str]] = []
        for name, m in self._tracked.items():
            for key in m.changed:
                try:
                    k = orjson.dumps(key).decode()
                    if key in m:
                        upserts.append((name, k, orjson.dumps(dict.__getitem__(m, key))))
                    else:
                        deletes.append((name, k))
                except TypeError as exc:
                    log.warning("state %s[%r]: not saved: %s", name, key, exc)
        try:
            db = self._db
            db.execute("BEGIN")
            if self._rewrite:
                db.execute("DELETE FROM state")
            if upserts:
                db.executemany("INSERT OR REPLACE INTO state (map, key, value) VALUES (?, ?, ?)", upserts)
            if deletes:
                db.executemany("DELETE FROM state WHERE map = ? AND key = ?", deletes)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._failed(str(exc))
            return
        self._last_error = ""
        self._rewrite = False
        self.flushes += 1
        self.rows_written += len(upserts) + len(deletes)
        for m in self._tracked.values():
            m.changed.clear()

    def _failed(self, why: str) -> None:
        """A flush that could not write: its keys stay changed for the next one; said once per cause."""
        if why != self._last_error:
            self._last_error = why
            log.error("%s: cannot save rule/enrich state (%s); retrying after the next batch", self.path, why)

    def _still_there(self) -> bool:
        """Does `state.db` still name the file we write (not deleted, not replaced, its directory not removed)?"""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def _recreate(self) -> None:
        """state.db (or state_dir) was removed under the run: saves went into a deleted file, and a restart
        found no state. Open a new one and write the whole state to it at this flush."""
        log.warning("%s: removed or replaced while running; writing the whole rule/enrich state to a new one",
                    self.path)
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        ensure_private_dir(self.path.parent)
        try:
            self._db, _ = self._open()  # a file put there meanwhile is read over: ours is the current state
        except sqlite3.DatabaseError as exc:
            self._set_aside(exc)
            self._db, _ = self._open()
        for name in list(self._loaded):  # maps no stage asked for yet are state too
            self.get(name)
        for m in self._tracked.values():
            m.changed.update(m.keys())
        self._rewrite = True

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        self.flush()
        try:
            self._db.close()
        except sqlite3.Error as exc:
            log.warning("%s: close failed: %s", self.path, exc)


def open_store(state_dir: Path) -> SqliteStateStore:
    """The local runtime's persistent state store in `state_dir`."""
    return SqliteStateStore(state_dir)

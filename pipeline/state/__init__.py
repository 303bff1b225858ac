"""`state_dir`: where everything that must survive a restart lives.

One directory per pipeline (top-level `state_dir:`, default `out/<name>`):
`capture_session.json`, the videodb source's `videodb_ws_id`/`videodb_ws_pid`,
`state.db` (rule and enrich state, see `store.py`) and disk spools. Stages
reach it as `context.state_dir`. `prepare()` creates it 0700 (symlinks
refused) and locks it, so two runs cannot resume the same session or write
the same state at once; the kernel drops the lock when the process dies,
even on `kill -9`. If the `lock` file (or the whole `state_dir`) is removed
while the run goes on, `guard()` makes and locks a new one within
`CHECK_SECONDS`, so a second run is still refused. A lock that cannot be made
again (a FIFO or a symlink put in its place, `state_dir` replaced by a symlink)
is one error line; the directory locked at start is the one followed, never
where a symlink put in its place points.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from pipeline.errors import StageError
from pipeline.files import FILE_MODE, ensure_private_dir
from pipeline.stale import remove_stale

__all__ = ["CHECK_SECONDS", "LOCK_FILE", "follow", "guard", "lock_also", "prepare", "release"]

log = logging.getLogger("pipeline.state")

LOCK_FILE = "lock"
CHECK_SECONDS = 0.5  # how soon a removed lock is made again
_held: dict[Path, int] = {}  # state_dir -> locked fd, for the life of the process
_keys: dict[Path, Path] = {}  # state_dir as given -> as resolved when it was locked
_refused: dict[Path, str] = {}  # state_dir -> the last "taken by another run" message logged


def _lock(state_dir: Path) -> int:
    """Open `state_dir/lock` and take it; StageError (one line, naming the holder's pid) when another run has it."""
    path = state_dir / LOCK_FILE
    try:  # O_NONBLOCK: a FIFO put there must not block the open
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror or exc
        raise StageError(f"{path}: cannot open the state lock: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device: truncating it raised a bare OSError
        os.close(fd)
        raise StageError(f"{path}: cannot use as the state lock: not a regular file (remove it)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StageError(f"{state_dir}: state_dir is in use by another pipeline run (pid {holder}); "
                         f"stop it or give this config its own state_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as exc:  # the pid is only a hint for the refused run's message; the lock is held
        log.warning("%s: cannot write this run's pid: %s", path, exc.strerror or exc)
    return fd


def prepare(state_dir: Path) -> Path:
    """Create `state_dir` (0700, symlinks refused) and lock it for this process; returns it."""
    ensure_private_dir(state_dir)
    key = state_dir.resolve()
    if key not in _held:
        _held[key] = _lock(state_dir)
        remove_stale(state_dir)  # ours alone now: what a `kill -9` left mid-write (`.<file>.<pid>.tmp`) goes
    _keys[state_dir.absolute()] = key
    return state_dir


def lock_also(state_dir: Path) -> bool:
    """Lock another directory a stage keeps what a restart resumes in (a controller's own `state_dir`), as
    `prepare()` does; True when this call took the lock (`release()` it), False when this process holds it
    already (it is the pipeline's own). Else two runs whose pipeline `state_dir`s differ both resumed the
    sessions saved there."""
    ensure_private_dir(state_dir)
    if state_dir.resolve() in _held:
        return False
    prepare(state_dir)
    return True


def _key(state_dir: Path) -> Path:
    """The directory `prepare()` locked: resolved then, not now (`state_dir` may have been replaced since by
    a symlink to another run's directory, which must not be taken for ours)."""
    return _keys.get(state_dir.absolute()) or state_dir.resolve()


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def follow(state_dir: Path) -> None:
    """If `state_dir/lock` is no longer the file this run holds (it, or `state_dir`, was removed or replaced),
    make and lock a new one, with one warning line; never raises."""
    key = _key(state_dir)
    fd = _held.get(key)
    if fd is None or _same_file(key / LOCK_FILE, fd):
        return
    try:
        ensure_private_dir(key)
        new = _lock(key)
    except StageError as exc:
        if _refused.get(key) != str(exc):  # once per holder, not every check
            _refused[key] = str(exc)
            log.error("%s/%s was removed or replaced while this run used it, and no new one can be locked: %s",
                      key, LOCK_FILE, exc)
        return
    _refused.pop(key, None)
    os.close(fd)
    _held[key] = new
    log.warning("%s/%s: removed while this run used it; locked a new one, so another run is still refused",
                key, LOCK_FILE)


async def guard(state_dir: Path) -> None:
    """Keep `state_dir` locked while the run goes on (cancel to stop): `follow()` every `CHECK_SECONDS`."""
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        follow(state_dir)


def release(state_dir: Path) -> None:
    """Drop the lock taken by `prepare()` (at the end of a run in a long-lived process, e.g. tests)."""
    key = _key(state_dir)
    _keys.pop(state_dir.absolute(), None)
    _refused.pop(key, None)
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)

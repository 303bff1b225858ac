"""`state_dir`: where everything that must survive a restart lives.

One directory per pipeline (top-level `state_dir:`, default `out/<name>`):
`capture_session.json`, the videodb source's `videodb_ws_id`/`videodb_ws_pid`,
`state.db` (rule and enrich state, see `store.py`) and disk spools. Stages
reach it as `context.state_dir`. `prepare()` creates it 0700 (symlinks
refused) and locks it, so two runs cannot resume the same session or write
the same state at once; the kernel drops the lock when the process dies,
even on `kill -9`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import StageError
from pipeline.files import FILE_MODE, ensure_private_dir

__all__ = ["LOCK_FILE", "prepare", "release"]

LOCK_FILE = "lock"
_held: dict[Path, int] = {}  # state_dir -> locked fd, for the life of the process


def prepare(state_dir: Path) -> Path:
    """Create `state_dir` (0700, symlinks refused) and lock it for this process; returns it."""
    ensure_private_dir(state_dir)
    key = state_dir.resolve()
    if key in _held:
        return state_dir
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    except OSError as exc:
        raise StageError(f"{path}: cannot open the state lock: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StageError(f"{state_dir}: state_dir is in use by another pipeline run (pid {holder}); "
                         f"stop it or give this config its own state_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[key] = fd
    return state_dir


def release(state_dir: Path) -> None:
    """Drop the lock taken by `prepare()` (at the end of a run in a long-lived process, e.g. tests)."""
    fd = _held.pop(state_dir.resolve(), None)
    if fd is not None:
        os.close(fd)

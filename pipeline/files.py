"""Private files: 0600 files in 0700 directories, symlinked paths refused.

Event files hold what people said and saw on screen; they are nobody else's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import StageError

FILE_MODE = 0o600
DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) with mode 0700; refuse it if it is a symlink."""
    if path.is_symlink():
        raise StageError(f"{path}: refusing a symlinked directory")
    if not path.exists():
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"{path}: cannot create directory: {exc.strerror or exc}") from None


def open_private(path: str | Path, *, truncate: bool = False) -> BinaryIO:
    """Open `path` for binary append (or truncate), 0600, never through a symlink."""
    p = Path(path)
    ensure_private_dir(p.parent if str(p.parent) else Path("."))
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    if truncate:
        flags |= os.O_TRUNC
    if p.is_symlink():
        raise StageError(f"{p}: refusing to write through a symlink")
    try:
        fd = os.open(p, flags, FILE_MODE)
    except OSError as exc:
        raise StageError(f"{p}: cannot open for writing: {exc.strerror or exc}") from None
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod a device or fifo we were pointed at
        try:
            os.fchmod(fd, FILE_MODE)
        except OSError:
            pass
    return os.fdopen(fd, "ab", buffering=0)


def write_private_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically, mode 0600 (state files such as ws ids)."""
    p = Path(path)
    ensure_private_dir(p.parent)
    if p.is_symlink():
        raise StageError(f"{p}: refusing to write through a symlink")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, p)

"""Private files: 0600 files in 0700 directories, no symlink anywhere in the path.

Event files hold what people said and saw on screen; they are nobody else's.
Paths are walked one component at a time from a directory descriptor with
`O_NOFOLLOW`, so a symlink placed anywhere in the path (at start or swapped in
mid-run) is refused instead of followed, and every directory we create is 0700.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import StageError

FILE_MODE = 0o600
DIR_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


def _refuse_link(shown: Path, dir_fd: int, name: str) -> StageError:
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError:
        target = "?"
    return StageError(f"{shown}: refusing a symlinked directory (-> {target}); give the real path")


def _open_dir(path: Path, *, create: bool) -> int:
    """A descriptor of directory `path`, walked component by component, never through a symlink.

    Missing components are created 0700 when `create`, else FileNotFoundError propagates.
    """
    fd = os.open("/" if path.is_absolute() else ".", _DIR_FLAGS)
    shown = Path(path.anchor)
    try:
        for name in path.parts[1:] if path.is_absolute() else path.parts:
            shown = shown / name
            while True:
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):  # created meanwhile: open it
                        os.mkdir(name, DIR_MODE, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                            os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise _refuse_link(shown, fd, name) from None
                    raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _parent(path: Path) -> Iterator[int]:
    try:
        fd = _open_dir(path.parent, create=True)
    except StageError:
        raise
    except OSError as exc:
        raise StageError(f"{path.parent}: cannot create directory: {exc.strerror or exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and each missing parent) with mode 0700; refuse a symlink anywhere in it."""
    try:
        os.close(_open_dir(Path(path), create=True))
    except StageError:
        raise
    except OSError as exc:
        raise StageError(f"{path}: cannot create directory: {exc.strerror or exc}") from None


def _open_in(dir_fd: int, p: Path, flags: int) -> int:
    """Open without blocking (a FIFO with no reader would block the event loop, and SIGTERM with it), then
    make the descriptor blocking again for ordinary writes."""
    try:
        fd = os.open(p.name, flags | _NOFOLLOW | os.O_NONBLOCK, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StageError(f"{p}: refusing to write through a symlink") from None
        if exc.errno == errno.ENXIO:
            raise StageError(f"{p}: cannot open for writing: it is a FIFO with no reader") from None
        raise StageError(f"{p}: cannot open for writing: {exc.strerror or exc}") from None
    os.set_blocking(fd, True)
    return fd


def open_private(path: str | Path, *, truncate: bool = False) -> BinaryIO:
    """Open `path` for binary append (or truncate), 0600, never through a symlink.

    Appending to a file whose last line is partial (a crash mid-write) first ends
    that line, so the next line starts on a line boundary and stays whole.
    """
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    with _parent(p) as dir_fd:
        fd = _open_in(dir_fd, p, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):  # never chmod or probe a device or fifo we were pointed at
                with contextlib.suppress(OSError):
                    os.fchmod(fd, FILE_MODE)
                if not truncate and st.st_size and _last_byte(dir_fd, p.name, st.st_size) != b"\n":
                    os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
    return os.fdopen(fd, "ab", buffering=0)


def still_names(path: str | Path, fh: BinaryIO) -> bool:
    """True while `path` names the file `fh` has open (False once it was deleted, renamed or swapped).

    Appenders check this before writing and open the path again when it is False, so lines never go
    into a deleted file (`rm`, logrotate's rename): one stat per write.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _last_byte(dir_fd: int, name: str, size: int) -> bytes:
    """The file's last byte, read through a second, read-only descriptor (ours is append-only)."""
    try:
        rfd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return b"\n"  # cannot read it back (a write-only file): append as before
    try:
        return os.pread(rfd, 1, size - 1)
    finally:
        os.close(rfd)


def check_writable(path: str | Path) -> None:
    """Raise StageError now if `open_private(path)` would fail later; creates missing parents, not the file."""
    p = Path(path)
    with _parent(p) as dir_fd:
        try:
            st = os.stat(p.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if not os.access(".", os.W_OK, dir_fd=dir_fd):
                raise StageError(f"{p}: cannot create the file: directory {p.parent} is not writable") from None
            return
        except OSError as exc:
            raise StageError(f"{p}: cannot open for writing: {exc.strerror or exc}") from None
        if stat.S_ISLNK(st.st_mode):
            raise StageError(f"{p}: refusing to write through a symlink")
        if stat.S_ISDIR(st.st_mode):
            raise StageError(f"{p}: cannot open for writing: it is a directory")
        os.close(_open_in(dir_fd, p, os.O_WRONLY | os.O_APPEND))


def write_private_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically, mode 0600 (state files such as ws ids)."""
    write_private_bytes(path, text.encode())


def write_private_bytes(path: str | Path, data: bytes) -> None:
    """`write_private_text` for bytes already encoded (a session record as orjson made it: no copy to str and
    back, records can hold megabytes of metadata)."""
    p = Path(path)
    with _parent(p) as dir_fd:
        try:
            st = os.stat(p.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise StageError(f"{p}: refusing to write through a symlink")
        tmp = f".{p.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, FILE_MODE, dir_fd=dir_fd)
            try:
                with contextlib.suppress(OSError):  # tells `stale.remove_stale` a writer is at it
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, p.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)  # a part written: the file it would have replaced stays as it was
            raise StageError(f"{p}: cannot write: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    """Every byte of `data`, or OSError: a full disk (or a file size limit) makes write() take only part, and
    one unchecked write() then renamed a torn file over the whole one it was to replace."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]

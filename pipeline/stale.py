"""Temporary files a killed writer left behind, and removing only those provably stale.

Every file the pipeline replaces atomically is first written to `.<name>.<pid>.tmp` beside it
(`files.write_private_bytes`), and the parquet sink writes `.part-...-<pid>-....parquet.tmp` until a file is
complete; a `kill -9` between the write and the rename left the temporary file there for ever (a parquet one
can be hundreds of MB). A temporary file is removed only when it is a regular file of ours (our uid, not a
symlink), in the directory given (never below it, never through a symlink), not locked by a writer, and its
pid is provably not its writer: no such process, or a process started after the file last changed (the pid
was reused, as after a container restart).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

log = logging.getLogger("pipeline.files")

PRIVATE_TMP = re.compile(r"\A\.(.+)\.(\d{1,10})\.tmp\Z")  # files.write_private_bytes: `.<name>.<pid>.tmp`
PARQUET_TMP = re.compile(r"\A\.(part-\d{8}T\d{6}-(\d{1,10})-[0-9a-z]+-\d{5,}\.parquet)\.tmp\Z")
SLACK = 2.0  # seconds: a process start time is known to about 1 s (the boot time is whole seconds)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def started_at(pid: int) -> float | None:
    """When process `pid` started (Unix time, to about 1 s), or None when not known (no /proc)."""
    boot = _boot_time()
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        ticks = int(raw[raw.rindex(b")") + 2:].split()[19])  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None
    return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")


def writer_gone(pid: int, mtime: float) -> bool:
    """True when no live process `pid` can have written a file last changed at `mtime`."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive (another user's)
    except OSError:
        return False
    started = started_at(pid)
    return started is not None and started > mtime + SLACK


def _locked(dir_fd: int, name: str) -> bool:
    """Does a writer hold a lock on it (the parquet sink does while it writes)? Unsure counts as locked."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _stale_entries(directory: Path, pid_of: Callable[[str], int | None], kind: Callable[[int], bool],
                   what: str) -> Iterator[tuple[int, str]]:
    """(directory's descriptor, name) of each entry right in `directory` (never below it, no symlink followed)
    that `pid_of` gives a writer's pid for, of `kind` (by its st_mode), ours (our uid), not locked, and whose
    writer is provably gone. Never raises: a directory it cannot list is logged (`what` was looked for)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError:
        return  # missing, not a directory, or a symlink: nothing of ours to clean there
    try:
        with os.scandir(dir_fd) as entries:
            found = [e.name for e in entries]
        uid = os.getuid()
        for name in found:
            pid = pid_of(name)
            if pid is None:
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if (kind(st.st_mode) and st.st_uid == uid and writer_gone(pid, st.st_mtime)
                    and not _locked(dir_fd, name)):  # a live writer (in another pid namespace too) holds its own
                yield dir_fd, name
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EACCES):
            log.warning("%s: cannot look for %s: %s", directory, what, exc.strerror or exc)
    finally:
        os.close(dir_fd)


def remove_stale(directory: Path, pattern: re.Pattern[str] = PRIVATE_TMP,
                 names: Collection[str] | None = None, *, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Remove the stale temporary files in `directory` that `pattern` names (group 1: the file it was to become,
    group 2: the writer's pid), only those for `names` if given; returns the names removed. Never raises."""

    def pid_of(name: str) -> int | None:
        m = pattern.match(name)
        if m is None or (names is not None and m.group(1) not in names) or (keep is not None and keep(name)):
            return None
        return int(m.group(2))

    removed: list[str] = []
    for dir_fd, name in _stale_entries(directory, pid_of, stat.S_ISREG, "temporary files left behind"):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
            removed.append(name)
    if removed:
        log.info("%s: removed %d temporary file(s) a killed run left behind", directory, len(removed))
    return removed


def remove_stale_dirs(directory: Path, prefix: str) -> list[str]:
    """Remove the directories `<prefix><pid>` in `directory` whose process is provably gone (a faust worker's
    `<host>-<pid>` data directory, left by a `kill -9`; a clean stop removes its own); returns their names."""

    def pid_of(name: str) -> int | None:
        pid = name[len(prefix):]
        return int(pid) if name.startswith(prefix) and pid.isdigit() and len(pid) <= 10 else None

    removed: list[str] = []
    for dir_fd, name in _stale_entries(directory, pid_of, stat.S_ISDIR, "stopped workers' directories"):
        try:
            shutil.rmtree(name, dir_fd=dir_fd)  # symlinks inside are removed, never followed
            removed.append(name)
        except OSError as exc:
            log.warning("%s/%s: cannot remove a stopped worker's directory: %s", directory, name, exc.strerror or exc)
    if removed:
        log.info("%s: removed %d directory(ies) of workers killed before they stopped", directory, len(removed))
    return removed


def hold_dir(path: Path) -> int:
    """Lock directory `path` for as long as the returned descriptor is open (this process's life): tells
    `remove_stale_dirs` of a worker that shares the directory, but not this pid namespace (a container on the
    same volume, its pid unknown there), that the directory is in use. -1 when it cannot be locked."""
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # still held open: closed with the process
    return fd

"""Read a config (or test) file's text: bounded, UTF-8, and only from something that is a file.

`/dev/zero` as a config path read forever, growing memory; a 50 MB file took the YAML parser half a
minute; a directory, a device or a socket gave the OS's words or hung. A config is small: past
MAX_BYTES it is refused before parsing, and everything but a regular file or a pipe (`<(envsubst < p.yaml)`)
is refused before it is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.errors import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped config is a few KB; 10,000 rule keywords fit many times over

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind_of(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a pipe ('a directory'…), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # reported by the open that follows, in the OS's words
    return next((name for test, name in _KINDS if test(mode)), None)


def read_bytes(path: Path, what: str = "config", limit: int = MAX_BYTES) -> bytes:
    """The content of a regular file or a pipe, at most `limit` bytes (ConfigError otherwise)."""
    kind = kind_of(path)
    if kind is not None:
        raise ConfigError(f"{path}: is {kind}, not a {what} file")
    try:
        with open(path, "rb") as fh:
            content = fh.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(content) > limit:
        raise ConfigError(f"{path}: larger than {_size(limit)}: not a {what} file (a {what} is a few KB)")
    return content


def read_text(path: Path, what: str = "config", limit: int = MAX_BYTES) -> str:
    """`read_bytes` decoded as UTF-8; a byte that is not UTF-8 is an error naming its line."""
    content = read_bytes(path, what, limit)
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{content[exc.start]:02x}); save the file as "
                          "UTF-8") from None


def is_regular(path: Path) -> bool:
    """True for a regular file (a reload reads only those: a named pipe would block the running pipeline)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def base_dir(path: Path) -> Path:
    """Where a config's relative input paths resolve: its directory, or the current one for a config read from
    a pipe (`<(envsubst < p.yaml)` is /dev/fd/63: `path: samples/x.jsonl` became /dev/fd/samples/x.jsonl)."""
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return Path.cwd()
    except OSError:
        pass
    return path.parent


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"

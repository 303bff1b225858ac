"""Secrets seen in the config are registered here and masked in every log line."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

MASK = "***"
MIN_LEN = 4  # shorter values are not secrets worth masking (and would mask half of every line)
#: secrets by their last MIN_LEN characters (a token's random end, where many share their start: JWTs,
#: "sk-..."), then by length, so a line is masked in one pass over it whatever the number of secrets: one per
#: live capture session's client token, thousands with the session API (a regex of them all, made again per
#: secret, cost O(n^2) to build). By length too: tokens that share their end (a fixed suffix) were each
#: compared at every place that end occurs (10,000 such tokens: 2 s to mask a 10 KB line); those of one
#: length are now one set lookup there. The one secret of a tail and length (the usual case) is kept as it
#: is, not in a set: a dict of strings the garbage collector need not track or walk (thousands of sessions'
#: tokens); `in` then compares it whole, the lengths being equal
_by_tail: dict[str, dict[int, str | set[str]]] = {}
#: `scheme://user:password@` (or `scheme://user@`) in any text: the whole user part is hidden. The scheme is
#: bounded: unbounded, every letter of a long run was tried as its start, each scanning to the run's end, and
#: a 1 MB line holding an "@" took many minutes to mask (a longer scheme still has its user part hidden)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}://)[^/?#@\s]+@")


log = logging.getLogger("pipeline.secrets")


def register(value: str, where: str | None = None) -> None:
    """Remember a secret (>= 4 chars) so `mask()` hides it everywhere. A shorter one cannot be masked (it
    would hide parts of every line); with `where` (what names it) that is said in one warning, not silently."""
    if len(value) >= MIN_LEN:
        group = _by_tail.setdefault(value[-MIN_LEN:], {})
        same = group.get(len(value))
        if same is None or same == value:
            group[len(value)] = value
        elif isinstance(same, str):
            group[len(value)] = {same, value}
        else:
            same.add(value)
    elif where is not None and value:
        log.warning("%s: shorter than %d characters, so it is not masked in logs and errors", where, MIN_LEN)


def forget(value: str) -> None:
    """Stop masking `value` (a client token whose session ended): what is remembered stays bounded."""
    group = _by_tail.get(value[-MIN_LEN:])
    same = group.get(len(value)) if group is not None else None
    if group is not None and same is not None:
        if isinstance(same, set):
            same.discard(value)
            if len(same) == 1:
                group[len(value)] = same.pop()
        elif same == value:
            del group[len(value)]
        if not group:
            del _by_tail[value[-MIN_LEN:]]


def known(value: str) -> bool:
    """Whether `value` is masked."""
    return value in _by_tail.get(value[-MIN_LEN:], {}).get(len(value), ())


def register_url(url: str) -> None:
    """A URL whose path or query may hold a token (webhooks): register the secret parts."""
    parts = urlsplit(url)
    if parts.password:
        register(parts.password)
    if parts.query:
        register(parts.query)
    if parts.path and parts.path not in ("", "/"):
        register(parts.path)


def mask(text: str) -> str:
    """`text` with registered secrets and the user part of URLs (`http://***@host`) replaced by ***."""
    if "@" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    return _mask_known(text) if _by_tail else text


def _mask_known(text: str) -> str:
    """Every character of every occurrence of a secret hidden: each run of overlapping occurrences becomes
    one MASK (a secret that overlaps another is hidden whole too). A run that starts with a slash (a URL's
    path) keeps it: `https://host/***`, not `https://host***` (`http://h:9/x` would read as port 9***)."""
    groups = _by_tail.get
    runs: list[list[int]] = []  # [start, end) of the runs found so far, by end
    for end in range(MIN_LEN, len(text) + 1):
        group = groups(text[end - MIN_LEN:end])
        if group is None:
            continue
        for length, same in group.items():
            start = end - length
            if start >= 0 and text[start:end] in same:
                while runs and start < runs[-1][1]:  # overlaps the runs before it: one run
                    start = min(start, runs.pop()[0])
                runs.append([start, end])
    if not runs:
        return text
    out: list[str] = []
    done = 0
    for start, end in runs:
        out += (text[done:start], "/" + MASK if text[start] == "/" else MASK)
        done = end
    out.append(text[done:])
    return "".join(out)


def mask_url(url: str) -> str:
    """`https://hooks.slack.com/services/T0/B0/xyz` -> `https://hooks.slack.com/***`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    tail = "/***" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


class MaskingFormatter(logging.Formatter):
    """Masks registered secrets in the whole formatted record, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))

"""Secrets seen in the config are registered here and masked in every log line."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

_known: set[str] = set()
_pattern: re.Pattern[str] | None = None
MASK = "***"
#: `scheme://user:password@` (or `scheme://user@`) in any text: the whole user part is hidden
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def register(value: str) -> None:
    """Remember a secret (>= 4 chars) so `mask()` hides it everywhere."""
    global _pattern
    if len(value) >= 4 and value not in _known:
        _known.add(value)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_known, key=len, reverse=True)))


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
    return _pattern.sub(_masked, text) if _pattern is not None else text


def _masked(m: re.Match[str]) -> str:
    """A URL path keeps its slash: `https://host/***`, not `https://host***` (`http://h:9/x` read as port 9***)."""
    return "/" + MASK if m.group().startswith("/") else MASK


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

"""Secrets seen in the config, and tokens made while running, are registered here and masked in every log line.

The config's secrets are few and fixed: one regex. Client tokens are made all the time (one per capture
session, and on every refresh): they are kept apart, indexed by their first characters, and forgotten once
expired, so neither the masking nor memory grows with the sessions a long run has served.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from urllib.parse import urlsplit

_known: set[str] = set()
_pattern: re.Pattern[str] | None = None
MASK = "***"
_HEAD = 4  # a secret is at least this long; tokens are looked up by their first _HEAD characters
MAX_TOKENS = 100_000  # tokens kept beyond that: the soonest to expire go first (else kept until they expire)
_tokens: dict[str, float] = {}  # token -> Unix time it expires
_expiry: list[tuple[float, str]] = []  # a heap of (expires, token), stale entries included (skipped when popped)
_by_head: dict[str, tuple[str, ...]] = {}  # first _HEAD characters -> tokens, longest first (replaced, not changed)
#: `scheme://user:password@` (or `scheme://user@`) in any text: the whole user part is hidden
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def register(value: str) -> None:
    """Remember a secret (>= 4 chars) so `mask()` hides it everywhere."""
    global _pattern
    if len(value) >= 4 and value not in _known:
        _known.add(value)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_known, key=len, reverse=True)))


def register_token(value: str, expires_at: float) -> None:
    """Mask a token made while running (a client token) until `expires_at` (Unix time); then it is forgotten."""
    if len(value) < _HEAD:
        return
    now = time.time()
    while _expiry and (_expiry[0][0] <= now or len(_tokens) >= MAX_TOKENS):
        when, token = heapq.heappop(_expiry)
        if _tokens.get(token) == when:  # else registered again since, with a later expiry
            del _tokens[token]
            _forget(token)
    if value not in _tokens:
        head = value[:_HEAD]
        _by_head[head] = tuple(sorted((*_by_head.get(head, ()), value), key=len, reverse=True))
    elif _tokens[value] >= expires_at:
        return
    _tokens[value] = expires_at
    heapq.heappush(_expiry, (expires_at, value))


def _forget(token: str) -> None:
    head = token[:_HEAD]
    rest = tuple(t for t in _by_head.get(head, ()) if t != token)
    if rest:
        _by_head[head] = rest
    else:
        _by_head.pop(head, None)


def _mask_tokens(text: str) -> str:
    """`text` with every registered token replaced by ***: one dict lookup per position, however many tokens."""
    heads, last, i = _by_head, 0, 0
    out: list[str] = []
    end = len(text) - _HEAD
    while i <= end:
        for token in heads.get(text[i:i + _HEAD], ()):
            if text.startswith(token, i):
                out += (text[last:i], MASK)
                i = last = i + len(token)
                break
        else:
            i += 1
    return "".join(out) + text[last:] if out else text


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
    if _pattern is not None:
        text = _pattern.sub(MASK, text)
    return _mask_tokens(text) if _by_head else text


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

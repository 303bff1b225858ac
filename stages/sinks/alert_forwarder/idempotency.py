"""Idempotency keys for alerts and digests, and the bounded set of keys already sent in this run."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable

from pipeline.events import Event, data, event_time_ms, text

KEY_LENGTH = 32


def label(event: Event) -> str:
    """The alert's label: `data.event_label`, else the lifecycle event name, else the channel."""
    value = data(event).get("event_label")
    if isinstance(value, str) and value:
        return value
    return str(event.get("event") or event.get("channel") or "event")


def alert_key(event: Event) -> str:
    """Stable hash of what identifies an alert: the same alert replayed gets the same key.

    (label, rtstream_id, event time ms, source channel, matched keywords, text): two alerts
    that differ in any of these (two channels at the same instant, two rules' texts) differ.
    """
    d = data(event)
    matched = d.get("matched")
    keywords = [m for m in matched if isinstance(m, str)] if isinstance(matched, list) else []
    parts = (label(event), str(event.get("rtstream_id") or ""), str(event_time_ms(event)),
             str(d.get("source_channel") or ""), "\x1f".join(keywords), text(event))
    if any("\x1e" in p for p in parts) or any("\x1f" in k for k in keywords):
        # A separator inside a field (screen text is anyone's) would let two different alerts join to the same
        # string, and the second be dropped as a duplicate: such alerts get an unambiguous encoding instead,
        # which contains no \x1e, so it cannot equal the plain form of any alert. Plain alerts keep their keys.
        raw = "\x1d" + json.dumps([*parts[:4], keywords, parts[5]])  # stdlib: escapes lone surrogates too
    else:
        raw = "\x1e".join(parts)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_LENGTH]


def digest_key(member_keys: Iterable[str]) -> str:
    """Key of a digest message, derived from its members (order-independent)."""
    raw = "digest|" + ",".join(sorted(member_keys))
    return hashlib.sha256(raw.encode()).hexdigest()[:KEY_LENGTH]


class SeenKeys:
    """Keys seen in this run, oldest forgotten past `capacity` so memory stays flat over hours."""

    __slots__ = ("_capacity", "_keys")

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember `key`; False when it was already there (a duplicate)."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._keys)

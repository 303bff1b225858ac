"""Which saved windows a `window` stage can take over at start: well-formed ones of its own config.

Why: state.db outlives the config. One damaged window entry (another version's shape, a hand edit) made
every batch of the run raise, so every event was retried alone, counted late and dead-lettered; a window
saved under another `size`, `slide` or `key` took this config's events under its own bounds (an event past
its `end` counted in it).
"""

from __future__ import annotations

from typing import Any

_COUNTS = ("events", "alerts")
_INTS = ("start", "end", "words", "talk_ms")
_TEXTS = (("ft", "first"), ("lt", "last"))


def _int(v: Any) -> bool:
    return type(v) is int


def _counts(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _int(n) for k, n in v.items())


def well_formed(skey: Any, acc: Any) -> bool:
    """Is `acc` an accumulator the stage can fold into and emit (as `_new` makes them), under a string key?"""
    if not isinstance(skey, str) or not isinstance(acc, dict) or not isinstance(acc.get("key"), dict):
        return False
    if not all(_int(acc.get(f)) for f in _INTS) or not all(_counts(acc.get(f)) for f in _COUNTS):
        return False
    kws = acc.get("keywords")
    if not isinstance(kws, list) or not all(isinstance(k, str) for k in kws):
        return False
    for t, text in _TEXTS:
        if (acc.get(t) is None) != (acc.get(text) is None) or not (acc.get(t) is None or (
                _int(acc[t]) and isinstance(acc[text], str))):
            return False
    return True


def same_config(acc: dict[str, Any], size: int, slide: int, fields: tuple[str, ...]) -> bool:
    """Was the (well-formed) `acc` opened by a stage of this `size`, `slide` (ms) and `key`?"""
    return acc["end"] - acc["start"] == size and acc["start"] % slide == 0 and tuple(acc["key"]) == fields

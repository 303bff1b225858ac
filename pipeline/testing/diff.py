"""Readable comparisons for test failures: subset matching, the closest event, alert lines."""

from __future__ import annotations

import difflib
import heapq
from collections import Counter
from typing import Any

import orjson


def subset(pattern: Any, value: Any) -> bool:
    """True when every key of `pattern` is in `value` with a matching value (recursively; lists equal length)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and subset(v, value[k]) for k, v in pattern.items())
    if isinstance(pattern, list):
        return (isinstance(value, list) and len(pattern) == len(value)
                and all(subset(p, v) for p, v in zip(pattern, value, strict=True)))
    if isinstance(pattern, bool) or isinstance(value, bool):
        return pattern is value
    return bool(pattern == value)


#: where an input event's value must be the same in an event out that matches it: events out are indexed by these
_INDEXED = (("data", "text"), ("unix_ts",), ("data", "start"), ("rtstream_id",), ("channel",))
_MISSING = object()


def _at(event: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(event, dict) or key not in event:
            return _MISSING
        event = event[key]
    return event if event is None or isinstance(event, (str, int, float)) else _MISSING  # (bool is an int)


def gone_events(events: list[dict[str, Any]], passed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input events no event out matches (`subset`). Each is compared only with the events out that have its
    value at an indexed place (its text, time...): every input event was compared with every event out, and
    `dropped:` over 5,000 events took 22 s, over the 100,000 an input_file may hold hours."""
    index: dict[tuple[str, ...], dict[Any, list[dict[str, Any]]]] = {path: {} for path in _INDEXED}
    for p in passed:
        for path, by_value in index.items():
            if (v := _at(p, path)) is not _MISSING:
                by_value.setdefault(v, []).append(p)
    gone = []
    for e in events:
        pools = [index[path].get(v, []) for path in _INDEXED if (v := _at(e, path)) is not _MISSING]
        if not any(subset(e, p) for p in (min(pools, key=len) if pools else passed)):
            gone.append(e)
    return gone


def _pretty(value: Any) -> list[str]:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=str).decode().splitlines()


_TEXT = 500  # characters of a text compared: a failing case's diff stays quick whatever its events hold
#: events compared with difflib (up to ~15 ms each for 500-character texts): every event out was, and a few typos
#: against 100,000 events took over an hour; the rest are ranked by the characters they share, in linear time
_EXACT = 20


def _similar(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a[:_TEXT], b[:_TEXT], autojunk=False).ratio()


def _shared(a: str, b: str) -> float:
    """The characters `a` and `b` share (difflib's quick_ratio, an upper bound of `_similar`), in linear time."""
    a, b = a[:_TEXT], b[:_TEXT]
    return 2 * sum((Counter(a) & Counter(b)).values()) / (len(a) + len(b)) if a or b else 1.0


def _score(pattern: Any, value: Any, similar: Any = _similar) -> float:
    if isinstance(pattern, dict) and isinstance(value, dict):
        if not pattern:
            return 1.0
        return sum(_score(v, value[k], similar) if k in value else 0.0 for k, v in pattern.items()) / len(pattern)
    if subset(pattern, value):
        return 1.0
    if isinstance(pattern, str) and isinstance(value, str):  # a typo's event, not the first one, is the closest
        return 0.9 * float(similar(pattern, value))
    return 0.0


def _project(pattern: Any, value: Any) -> Any:
    """`value` cut down to the keys `pattern` names, so a diff shows only what the test is about."""
    if isinstance(pattern, dict) and isinstance(value, dict):
        return {k: _project(pattern[k], value[k]) for k in pattern if k in value}
    return value


def closest(pattern: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """A unified diff between the pattern and the most similar event (or a note when there is none)."""
    if not events:
        return "    (no events came out)"
    rough = heapq.nlargest(_EXACT, range(len(events)), key=lambda i: _score(pattern, events[i], _shared))
    best = events[max(sorted(rough), key=lambda i: _score(pattern, events[i]))]  # ties: the first event
    lines = difflib.unified_diff(_pretty(pattern), _pretty(_project(pattern, best)),
                                 "expected", "closest event out", lineterm="", n=2)
    return "\n".join("    " + ln for ln in lines)


def alert_line(a: dict[str, Any]) -> str:
    data = a.get("data") if isinstance(a.get("data"), dict) else {}
    assert isinstance(data, dict)
    where = a.get("rtstream_name") or a.get("rtstream_id") or "-"
    return (f"{data.get('event_label')} [{data.get('severity')}] on {where} matched {data.get('matched')} "
            f"at {data.get('timestamp')}")

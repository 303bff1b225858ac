"""Readable comparisons for test failures: subset matching, the closest event, alert lines."""

from __future__ import annotations

import difflib
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


def _pretty(value: Any) -> list[str]:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=str).decode().splitlines()


_TEXT = 500  # characters of a text compared: a failing case's diff stays quick whatever its events hold


def _score(pattern: Any, value: Any) -> float:
    if isinstance(pattern, dict) and isinstance(value, dict):
        if not pattern:
            return 1.0
        return sum(_score(v, value[k]) if k in value else 0.0 for k, v in pattern.items()) / len(pattern)
    if subset(pattern, value):
        return 1.0
    if isinstance(pattern, str) and isinstance(value, str):  # a typo's event, not the first one, is the closest
        return 0.9 * difflib.SequenceMatcher(None, pattern[:_TEXT], value[:_TEXT], autojunk=False).ratio()
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
    best = max(events, key=lambda e: _score(pattern, e))
    lines = difflib.unified_diff(_pretty(pattern), _pretty(_project(pattern, best)),
                                 "expected", "closest event out", lineterm="", n=2)
    return "\n".join("    " + ln for ln in lines)


def alert_line(a: dict[str, Any]) -> str:
    data = a.get("data") if isinstance(a.get("data"), dict) else {}
    assert isinstance(data, dict)
    where = a.get("rtstream_name") or a.get("rtstream_id") or "-"
    return (f"{data.get('event_label')} [{data.get('severity')}] on {where} matched {data.get('matched')} "
            f"at {data.get('timestamp')}")

"""Event-field templates such as `videodb.{channel}` or `{capture_session_id|rtstream_id}`.

Compiled once into literal parts and field getters, so rendering per event is a
few dict lookups and one join (no `str.format` parsing on the hot path).

Fields: `channel` is the canonical channel (lifecycle events give
`capture_session`, `scene_index` gives `visual_index`); any other name is a
top-level event key, else a key of `data`; `a.b` walks nested objects;
`x|y` takes the first non-empty alternative. A missing field renders as "".
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from pipeline.events import Event, canonical, channel

Getter = Callable[[Event], str]


def _as_text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _field_getter(path: str) -> Getter:
    """A getter for one field name (no alternatives)."""
    if path == "channel":
        return lambda ev: canonical(channel(ev))
    parts = path.split(".")
    if len(parts) == 1:
        key = parts[0]

        def top_or_data(ev: Event) -> str:
            if key in ev:
                return _as_text(ev[key])
            d = ev.get("data")
            return _as_text(d.get(key)) if isinstance(d, dict) else ""

        return top_or_data

    def nested(ev: Event) -> str:
        cur: Any = ev
        for p in parts:
            if not isinstance(cur, dict):
                return ""
            cur = cur.get(p)
        return _as_text(cur)

    return nested


def _alternatives(spec: str) -> Getter:
    getters = [_field_getter(name.strip()) for name in spec.split("|")]
    if len(getters) == 1:
        return getters[0]

    def first(ev: Event) -> str:
        for g in getters:
            v = g(ev)
            if v:
                return v
        return ""

    return first


class Template:
    """A compiled template: `render(event) -> str`; `static` when it names no field."""

    __slots__ = ("_parts", "_text", "fields", "source", "static")

    def __init__(self, source: str) -> None:
        self.source = source
        self._parts: list[str | Getter] = []
        self.fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ValueError(f"bad template {source!r}: {exc}") from None
        for literal, field, spec, conv in parsed:
            if literal:
                self._parts.append(literal)
            if field is None:
                continue
            if not field.strip() or spec or conv:
                raise ValueError(f"bad template {source!r}: use plain fields like {{channel}}")
            self.fields.append(field)
            self._parts.append(_alternatives(field))
        self.static = not self.fields
        self._text = "".join(p for p in self._parts if isinstance(p, str)) if self.static else ""

    def render(self, event: Event) -> str:
        if self.static:
            return self._text
        return "".join(p if isinstance(p, str) else p(event) for p in self._parts)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

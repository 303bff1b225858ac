"""Safe `str.format` templates: `{name}` and `{name[key]}` lookups only, missing keys render empty.

Plain `str.format_map` would also allow `{data.__class__...}` attribute walks
into interpreter internals; this formatter resolves only names and `[key]`
indexes into the dicts and lists of the event, and is checked at config time.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

_FIELD = re.compile(r"^[A-Za-z_]\w*(?:\[[^\[\]]*\])*$")
_NAME = re.compile(r"^[A-Za-z_]\w*")
_INDEX = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"\d+")
MAX_WIDTH = 1000


def check_template(template: str) -> str:
    """Validate: balanced braces, only `name[key]...` fields, fixed format specs (width <= MAX_WIDTH).

    Raises ValueError.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc}") from None
    for _literal, field, spec, _conversion in parts:
        if field is None:
            continue
        if not _FIELD.match(field):
            raise ValueError(f"template field {{{field}}}: only names and [key] lookups are allowed, "
                             "e.g. {data[event_label]}")
        if spec and "{" in spec:  # `{text:>{data[w]}}` would let an event choose the width
            raise ValueError(f"template field {{{field}:{spec}}}: a format spec cannot contain fields; "
                             "write a fixed one, e.g. {text:>20}")
        if spec and any(len(n) > 6 or int(n) > MAX_WIDTH for n in _NUMBER.findall(spec)):
            raise ValueError(f"template field {{{field}:{spec}}}: widths and precisions are at most {MAX_WIDTH}")
    return template


def lookup(values: Mapping[str, Any], field: str) -> Any:
    """Resolve `name[key][0]...` in `values`; anything missing or not indexable gives ""."""
    m = _NAME.match(field)
    if m is None:
        return ""
    obj: Any = values.get(m.group(0), "")
    for key in _INDEX.findall(field[m.end():]):
        if isinstance(obj, Mapping):
            obj = obj.get(key, "")
        elif (isinstance(obj, Sequence) and not isinstance(obj, str) and key.isascii() and key.isdigit()
              and len(key) <= 18 and int(key) < len(obj)):  # `[²]` passes isdigit(), then int() raises
            obj = obj[int(key)]
        else:
            return ""
    return obj


class _SafeFormatter(string.Formatter):
    """Formatter whose fields are `lookup()`s; a bad format spec falls back to `str(value)`."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return lookup(kwargs, field_name), field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:
            return ""
        try:
            return format(value, format_spec)
        except (TypeError, ValueError):
            return str(value)


_FORMATTER = _SafeFormatter()


def render(template: str, values: Mapping[str, Any]) -> str:
    """Render a template checked by `check_template` over `values`."""
    return _FORMATTER.vformat(template, (), values)

"""What a session API body may hold beyond being JSON: a bounded nesting, and integers kept exactly.

orjson reads an integer literal beyond 64 bits as a float, without a word: a session's metadata would keep
1.2345678901234568e+29 where the client sent 123456789012345678901234567890. Such a body is refused instead.
"""

from __future__ import annotations

import json
from typing import Any, Final

#: Floats at least this large may have been integer literals beyond 64 bits (-2**63 itself rounds to it).
_WIDE: Final = 2.0**63
#: Digits of an integer literal shown in an error.
_SHOWN: Final = 40


def body_problem(body: Any, raw: bytes, max_depth: int) -> str | None:
    """What is wrong with a parsed body (`raw`: its bytes), or None: nesting deeper than `max_depth` levels, or
    an integer that does not fit 64 bits. The walk goes a level at a time (the children of a level gathered
    by C code, only containers looked at in Python: item by item, 16 MiB of `[[], [], ...]` held the event
    loop for 2.3 s, now 0.4 s); the bytes are read again only when a float as wide as 2**63 was found."""
    level = [body] if type(body) is dict or type(body) is list else []
    wide = False
    for _ in range(max_depth):
        if not level:
            break
        children: list[Any] = []
        for item in level:
            children.extend(item.values() if type(item) is dict else item)
        if not wide and float in set(map(type, children)):
            wide = any(type(c) is float and abs(c) >= _WIDE and c.is_integer() for c in children)
        level = [c for c in children if type(c) is list or type(c) is dict]  # what orjson makes: no subclasses
    if level:
        return f"body is nested deeper than {max_depth} levels"
    literal = _beyond_64_bits(raw) if wide else None
    if literal is not None:
        shown = literal if len(literal) <= _SHOWN else f"{literal[:_SHOWN]}... ({len(literal)} digits)"
        return f"the integer {shown} does not fit in 64 bits; send it as a string to keep it exactly"
    return None


def _beyond_64_bits(raw: bytes) -> str | None:
    """The first integer literal in `raw` outside -2**63 .. 2**64-1, or None (the body parsed and its depth
    checked already, so the standard parser's recursion is bounded)."""
    found: list[str] = []

    def exact(text: str) -> int:
        digits = len(text) - text.startswith("-")
        if not found and (digits > 20 or not -(2**63) <= int(text) < 2**64):  # > 20 digits: never int() it
            found.append(text)
        return 0

    json.loads(raw, parse_int=exact)
    return found[0] if found else None

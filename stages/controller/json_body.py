"""What a session API body may hold beyond being JSON: a bounded nesting, and integers kept exactly.

orjson reads an integer literal beyond 64 bits as a float, without a word: a session's metadata would keep
1.2345678901234568e+29 where the client sent 123456789012345678901234567890. Such a body is refused instead.
"""

from __future__ import annotations

import re
from itertools import compress
from typing import Any, Final

#: Floats at least this large may have been integer literals beyond 64 bits (-2**63 itself rounds to it).
_WIDE: Final = 2.0**63
#: Digits of an integer literal shown in an error.
_SHOWN: Final = 40


def body_problem(body: Any, raw: bytes, max_depth: int) -> str | None:
    """What is wrong with a parsed body (`raw`: its bytes), or None: nesting deeper than `max_depth` levels, or
    an integer that does not fit 64 bits. The walk goes a level at a time, every pass over a level's values
    done by C code (`map`, `set`, `compress`, `max`): item by item in Python, 16 MiB of `[[], [], ...]` held
    the event loop for 2.3 s, now about 1 s (its parse: 3 s). The bytes are read again only when a float as
    wide as 2**63 was found."""
    level = [body] if type(body) is dict or type(body) is list else []
    wide = False
    for _ in range(max_depth):
        if not level:
            break
        children: list[Any] = []
        for item in level:
            children.extend(item.values() if type(item) is dict else item)
        types = list(map(type, children))
        kinds = set(types)
        if not wide and float in kinds:  # (a float this wide is a whole number)
            floats = list(compress(children, map(_IS_FLOAT, types)))
            wide = max(floats) >= _WIDE or min(floats) <= -_WIDE
        # what orjson makes: no subclasses
        level = list(compress(children, map(_IS_CONTAINER, types))) if list in kinds or dict in kinds else []
    if level:
        return f"body is nested deeper than {max_depth} levels"
    literal = _beyond_64_bits(raw) if wide else None
    if literal == "":
        return (f"body has more than {MAX_RUNS} numbers of 19 or more digits, beside one that may not fit in 64 "
                "bits; send the long integers as strings")
    if literal is not None:
        shown = literal if len(literal) <= _SHOWN else f"{literal[:_SHOWN]}... ({len(literal)} digits)"
        return f"the integer {shown} does not fit in 64 bits; send it as a string to keep it exactly"
    return None


_FLOATS: Final[dict[type, bool]] = {float: True}
_CONTAINERS: Final[dict[type, bool]] = {list: True, dict: True}
_IS_FLOAT: Final = _FLOATS.get  # (a dict's get: no Python call per value)
_IS_CONTAINER: Final = _CONTAINERS.get


def _beyond_64_bits(raw: bytes) -> str | None:
    """The first bare integer in `raw` outside -2**63 .. 2**64-1, or None. A run of 19 or more digits between
    the bytes that can surround a JSON number (not a `.`, `e` or a letter) is one; a string holding such a run
    between a `:` and a `,` is taken for one too, so with a float as wide found as well, that rare body is
    refused. Found with a translate and a find (parsing again with the standard library to see the literals
    took 2 s of event loop for 16 MiB of `1e19,`, this 0.1 s), and at most MAX_RUNS runs are looked at: "" when
    there are more (not None: 10,000 19-digit IDs before an integer beyond 64 bits let it through)."""
    flat = raw.translate(_DIGITS_TO_ZERO)
    at, seen = flat.find(_RUN), 0
    while at >= 0 and seen < MAX_RUNS:
        seen += 1
        end = _ZEROS.match(flat, at).end()  # type: ignore[union-attr]
        start = at - 1 if at and raw[at - 1] == 0x2D else at  # a minus sign
        if (start == 0 or raw[start - 1] in _BEFORE) and (end == len(raw) or raw[end] in _AFTER):
            literal = raw[start:end].decode()
            if end - at > 20 or not -(2**63) <= int(literal) < 2**64:
                return literal
        at = flat.find(_RUN, end)
    return "" if at >= 0 else None


_ZEROS: Final = re.compile(b"0+")
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_RUN: Final = b"0" * 19  # the fewest digits of an integer beyond 64 bits (-9223372036854775809)
_BEFORE: Final = frozenset(b":,[ \t\r\n")  # what may come right before a number in JSON
_AFTER: Final = frozenset(b",]} \t\r\n")
#: Digit runs looked at in one body (each a few microseconds), so the check is bounded whatever the body.
MAX_RUNS: Final = 10_000

"""Text from events shown on a terminal: control characters (ESC sequences among them) made visible.

Event text comes off the wire; printed raw, `ESC ] 0 ; …` retitles the operator's terminal,
`ESC [ 2 J` clears it, and some terminals act on more. Each C0/C1 control and DEL is shown
as `\\xNN` instead (a bidirectional override or isolate as `\\u202e`); text without any (nearly all of
it) is returned as it is, after one scan.
"""

from __future__ import annotations

import re

# Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) as well: a terminal that
# applies the bidi algorithm showed the rest of the line reversed after one (`wire to <U+202E>1234` read as 4321,
# a console alert's `(matched: ...)` tail too), so a peer could make a line show what it does not hold.
_BIDI = "\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_BIDI}]")
_CONTROL_IN_LINES = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI}]")  # all but tab and newline


def _hex(m: re.Match[str]) -> str:
    n = ord(m[0])
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def visible(text: str) -> str:
    """`text` with every control character written as `\\xNN` (tabs and newlines included: one line stays one)."""
    return text if _CONTROL.search(text) is None else _CONTROL.sub(_hex, text)


def visible_lines(text: str) -> str:
    """`visible()`, except that tabs and newlines stay (a log record with its traceback)."""
    return text if _CONTROL_IN_LINES.search(text) is None else _CONTROL_IN_LINES.sub(_hex, text)

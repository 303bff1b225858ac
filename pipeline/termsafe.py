"""Text from events shown on a terminal: control characters (ESC sequences among them) made visible.

Event text comes off the wire; printed raw, `ESC ] 0 ; …` retitles the operator's terminal,
`ESC [ 2 J` clears it, and some terminals act on more. Each C0/C1 control and DEL is shown
as `\\xNN` instead; text without any (nearly all of it) is returned as it is, after one scan.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline


def _hex(m: re.Match[str]) -> str:
    return f"\\x{ord(m[0]):02x}"


def visible(text: str) -> str:
    """`text` with every control character written as `\\xNN` (tabs and newlines included: one line stays one)."""
    return text if _CONTROL.search(text) is None else _CONTROL.sub(_hex, text)


def visible_lines(text: str) -> str:
    """`visible()`, except that tabs and newlines stay (a log record with its traceback)."""
    return text if _CONTROL_IN_LINES.search(text) is None else _CONTROL_IN_LINES.sub(_hex, text)

"""The `{channel}` part of a sink's output path: a channel name off the wire, made safe and bounded.

Why: a peer picks the channel. It must never pick a directory (`../x`), and made-up names must not each get
a file or directory of their own (300 names made 300 directories of one-row files). Built-in channels always
get theirs; MAX_NAMED other plain names do too, in the order they come; everything else goes to `unknown`.
"""

from __future__ import annotations

import re
from typing import Final

from pipeline.channels import BUILTIN_CHANNELS

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")  # \Z: `$` would let a final newline through
MAX_NAMED: Final = 64


class ChannelNames:
    """Maps an event's channel to the name its `{channel}` path part uses."""

    def __init__(self) -> None:
        self._named: set[str] = set()  # names besides the built-in channels that have a path of their own

    def __call__(self, raw: str) -> str:
        if raw in BUILTIN_CHANNELS or raw in self._named:
            return raw
        if len(self._named) < MAX_NAMED and SAFE_NAME.match(raw):
            self._named.add(raw)
            return raw
        return "unknown"

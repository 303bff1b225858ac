"""The "not delivered, dead-lettered" warning, at most once a minute per destination.

A webhook that refuses everything (a revoked Slack URL answers 404 at once) during an alert storm would
otherwise log one line per alert: the receiver decided how much we write to stderr. Every alert is still in
the dead-letter file with its own reason; the log says the first, then how many more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.api import Log

WARN_EVERY = 60.0  # seconds between two warnings for one destination


class DeadLetterWarnings:
    """Warns for a destination's first dead-lettered alerts, then at most every `every` s with the count since."""

    def __init__(self, log: Log, every: float = WARN_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._every = every
        self._clock = clock
        self._last: dict[str, float] = {}  # destination (masked URL; from the config: few) -> last warning
        self._held: dict[str, int] = {}  # destination -> alerts dead-lettered since, not yet logged

    def warn(self, dest: str, n: int, reason: str) -> None:
        now = self._clock()
        last = self._last.get(dest)
        if last is not None and now - last < self._every:
            self._held[dest] = self._held.get(dest, 0) + n
            return
        since = self._held.pop(dest, 0)
        more = f" (and {since} more since the last warning)" if since else ""
        self._last[dest] = now
        self._log.warning("alert_forwarder: %s: %d alert(s) not delivered, dead-lettered: %s%s",
                          dest, n, reason, more)

    def flush(self) -> None:
        """At close: say how many were dead-lettered since each destination's last warning."""
        for dest, n in self._held.items():
            self._log.warning("alert_forwarder: %s: %d more alert(s) not delivered since the last warning; "
                              "the dead-letter file has each with its reason", dest, n)
        self._held.clear()

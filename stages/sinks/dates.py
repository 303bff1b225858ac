"""UTC dates for `{date}` in sink paths, formatted once per day (the hot path only divides)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any


class UtcDays:
    """`days(unix_ts)` -> "YYYY-MM-DD" (UTC; now when the value is not a finite number); cached per day number."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def __call__(self, unix: Any) -> str:
        if not isinstance(unix, int | float) or isinstance(unix, bool) or not math.isfinite(unix):
            unix = time.time()
        day = int(unix // 86400)
        text = self._cache.get(day)
        if text is None:
            try:
                text = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
            except (OverflowError, ValueError, OSError):  # a huge event time: today, not a crash
                text = datetime.now(UTC).strftime("%Y-%m-%d")
            if len(self._cache) > 1024:  # bounded: a peer choosing times cannot grow it
                self._cache.clear()
            self._cache[day] = text
        return text

"""Forgetting stage state by event time, so a stream of distinct ids cannot grow it without bound.

Shared by `rules` (cooldowns, windows) and `enrich` (rtstream map). The
watermark is the newest event time seen; an entry whose own time is older
than `watermark - horizon` is dropped, and a mapping over `max_keys` loses its
oldest entries down to 90% of the cap. A sweep walks the whole mapping, so it
runs at most once per minute of event time, or when a cap is exceeded.
An event time more than a day ahead of the wall clock does not move the
watermark: one event from a peer with a bogus future timestamp must not make
all state look expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

SWEEP_EVERY_MS = 60_000
FUTURE_SLACK_MS = 86_400_000


class Eviction:
    """When to sweep, and the sweep itself."""

    __slots__ = ("ceiling", "evicted", "horizon_ms", "max_keys", "next_sweep", "watermark")

    def __init__(self, horizon_ms: int, max_keys: int) -> None:
        self.horizon_ms = horizon_ms
        self.max_keys = max_keys
        self.watermark = 0
        self.next_sweep = 0
        self.evicted = 0
        self.ceiling = int(time.time() * 1000) + FUTURE_SLACK_MS

    def seen(self, when: int) -> None:
        if self.watermark < when <= self.ceiling:
            self.watermark = when

    def due(self, *maps: MutableMapping[Any, Any]) -> bool:
        """Once per batch: is a sweep due? (Also moves the future-time ceiling along with the clock.)"""
        self.ceiling = int(time.time() * 1000) + FUTURE_SLACK_MS
        if self.watermark >= self.next_sweep:
            return True
        cap = self.max_keys
        return any(len(m) > cap for m in maps)

    def sweep(self, m: MutableMapping[Any, Any], time_of: Callable[[Any], int]) -> int:
        """Drop entries older than the horizon, then the oldest beyond the cap; returns how many went."""
        cutoff = self.watermark - self.horizon_ms
        old = [k for k, v in m.items() if time_of(v) < cutoff]
        for k in old:
            del m[k]
        n = len(old)
        if len(m) > self.max_keys:
            ordered = sorted(m.items(), key=lambda kv: time_of(kv[1]))
            extra = ordered[: len(m) - self.max_keys * 9 // 10]
            for k, _ in extra:
                del m[k]
            n += len(extra)
        self.next_sweep = self.watermark + SWEEP_EVERY_MS
        self.evicted += n
        return n

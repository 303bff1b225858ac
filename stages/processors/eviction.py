"""Forgetting stage state by event time, so a stream of distinct ids cannot grow it without bound.

Shared by `rules` (cooldowns, windows) and `enrich` (rtstream map). The
watermark is the newest event time seen; an entry whose own time is older
than `watermark - horizon` is dropped, and a mapping over `max_keys` loses its
oldest entries down to 90% of the cap. A sweep walks the whole mapping, so it
runs at most once per `every_ms` of event time (a minute; `rules` uses a
quarter of its horizon when that is longer, since nothing can expire sooner),
or when a cap is exceeded.
An event time ahead of the wall clock moves the watermark only up to the
clock: one event from a peer with a bogus future timestamp must not make all
state look expired (with a day's slack, one event 23 h ahead swept every
cooldown, window count and rtstream name).
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

SWEEP_EVERY_MS = 60_000


class Eviction:
    """When to sweep, and the sweep itself."""

    __slots__ = ("ceiling", "every_ms", "evicted", "horizon_ms", "max_keys", "next_sweep", "others", "watermark")

    def __init__(self, horizon_ms: int, max_keys: int, every_ms: int = SWEEP_EVERY_MS) -> None:
        self.horizon_ms = horizon_ms
        self.every_ms = every_ms
        self.max_keys = max_keys
        self.watermark = 0
        self.next_sweep = 0
        self.evicted = 0
        self.others: dict[int, int] = {}  # id(mapping) -> its keys another stage owns, at the last sweep
        self.ceiling = int(time.time() * 1000)  # the wall clock, moved along once per batch (due())

    def seen(self, when: int) -> None:
        if self.watermark < when:
            self.watermark = when if when <= self.ceiling else max(self.watermark, self.ceiling)

    def due(self, *maps: MutableMapping[Any, Any]) -> bool:
        """Once per batch: is a sweep due? (Also moves the future-time ceiling along with the clock.)"""
        self.ceiling = int(time.time() * 1000)
        if self.watermark >= self.next_sweep:
            return True
        cap, others = self.max_keys, self.others
        return any(len(m) > cap + others.get(id(m), 0) for m in maps)

    def sweep(self, m: MutableMapping[Any, Any], time_of: Callable[[Any], int],
              mine: Callable[[Any], bool] | None = None) -> int:
        """Drop entries older than the horizon, then the oldest beyond the cap; returns how many went.

        `mine`: which keys are this stage's, where stages share a mapping; the others are left to their owner."""
        cutoff = self.watermark - self.horizon_ms
        kept: list[tuple[Any, int]] = []
        old = []
        for k, v in m.items():
            if mine is not None and not mine(k):
                continue
            t = time_of(v)
            if t < cutoff:
                old.append(k)
            else:
                kept.append((k, t))
        for k in old:
            del m[k]
        n = len(old)
        if len(kept) > self.max_keys:
            kept.sort(key=lambda kt: kt[1])
            extra = kept[: len(kept) - self.max_keys * 9 // 10]
            for k, _ in extra:
                del m[k]
            n += len(extra)
            del kept[: len(extra)]
        self.others[id(m)] = len(m) - len(kept)
        self.next_sweep = self.watermark + self.every_ms
        self.evicted += n
        return n

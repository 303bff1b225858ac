"""Token bucket: `count` messages per `per` seconds with bursts up to `capacity`."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class TokenBucket:
    """Refills continuously; starts full so the first burst goes out at once."""

    def __init__(self, count: float, per: float, capacity: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = count / per
        self.capacity = float(capacity if capacity is not None else max(1, math.floor(count)))
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Spend one token if there is one."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    async def acquire(self) -> None:
        """Wait for a token and spend it."""
        while not self.take():
            await asyncio.sleep(self.delay())

"""Exponential backoff with jitter for reconnect loops (1 s doubling to 60 s by default)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Delays for successive retries: initial * 2**n, capped, with +-`jitter` fraction.

    `max_retries=None` retries forever; `next()` returns None once retries are exhausted.
    """

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 0.2
    max_retries: int | None = None
    attempt: int = 0

    def next(self) -> float | None:
        if self.max_retries is not None and self.attempt >= self.max_retries:
            return None
        base = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        self.attempt = 0
